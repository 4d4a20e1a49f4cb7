"""Small real documents for the knowledge-base tests, each holding facts found nowhere else."""

from __future__ import annotations

import io
import zipfile


def pdf_bytes(pages: list[list[str]]) -> bytes:
    """A valid PDF (Helvetica, one text line per entry) built by hand; ASCII text only."""
    objects: list[bytes] = []
    n_pages = len(pages)
    font_id = 3 + 2 * n_pages
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, lines in enumerate(pages):
        content_id = 4 + 2 * i
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content_id} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        ops = ["BT", "/F1 11 Tf", "72 740 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops += [f"({escaped}) Tj", "0 -16 Td"]
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def encrypted_pdf_bytes(pages: list[list[str]], password: str = "secret") -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf_bytes(pages))))
    writer.encrypt(user_password=password, algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def docx_bytes(
    heading: str, paragraphs: list[str], table: list[list[str]] | None = None, subheading: str | None = None
) -> bytes:
    import docx

    document = docx.Document()
    document.add_heading(heading, level=1)
    if subheading:
        document.add_heading(subheading, level=2)
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, text in enumerate(row):
                grid.cell(r, c).text = text
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def zip_bomb_docx() -> bytes:
    """A zip that claims to be a DOCX and inflates 64 MiB of zeros from about 64 KiB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", b"\0" * (64 << 20))
    return buffer.getvalue()


DEEPSPEED_README = """# DeepSpeed quick start

DeepSpeed is a deep learning optimization library.

## Installation

Install DeepSpeed from PyPI with `pip install deepspeed==0.14.2`. Before installing, make sure
PyTorch is installed. After installing, run `ds_report` to check which ops are compatible.

## Launching

Start a training job with `deepspeed train.py --deepspeed_config ds_config.json`.
"""

# Unique facts per file type, for upload-and-ask tests: (file name, bytes builder, question, answer word)
FACTS_TXT = "The Zorblatt reactor in Nagano runs on lemon juice and was built in 1987 by Ilse Varga."
FACTS_MD = (
    "# Office guide\n\n## Parking\n\nVisitors park on level minus three, bay Q17, and show ticket 4471.\n\n"
    "## Lunch\n\nThe canteen serves okonomiyaki on Thursdays only.\n"
)
FACTS_JA = "社内の忘年会は十二月二十日に浅草の料亭「さくら庵」で開かれます。会費は五千円です。"
FACTS_ZH = "公司的年度旅行将于九月十五日前往桂林，集合地点是北门停车场。"
DOCX_FACT = "The emergency generator is tested every Tuesday at 06:30 by technician Boris Kell."
PDF_FACT_PAGE_2 = "The warehouse door code is 7351 and it changes every March."
