"""Uploaded bytes -> text sections (page and heading kept), through well-kept parsers.

TXT is decoded (UTF-8, UTF-16 with a BOM, else charset detection: Shift_JIS and GB18030 files
are common); Markdown is cut on its headings by LangChain's `MarkdownHeaderTextSplitter`; DOCX
is read with python-docx (paragraphs and tables in document order, Heading styles as the heading
path); PDF with pypdf, one section per page. Every failure is a typed 4xx naming the file.
"""

from __future__ import annotations

import io
import logging
import re
import time
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from easllm.errors import InvalidRequest, TooLarge, UnsupportedMedia

if TYPE_CHECKING:  # imported when a file of their kind comes
    from docx.table import Table
    from pypdf import PdfReader

log = logging.getLogger(__name__)

PARAM = "files"  # the multipart field the errors name
KINDS = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".docx": "docx", ".pdf": "pdf"}
MAX_NAME_CHARS = 200
# DOCX is a zip: refuse archives that would inflate far beyond what a document needs.
MAX_UNZIPPED_BYTES = 512 * 1024 * 1024
MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_RATIO = 200  # per entry, for entries over 1 MiB unzipped
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# PDFs: pypdf refuses cyclic page trees and xref chains, decompression bombs and runaway form
# XObjects; a file can still repeat one costly page many thousand times, so extraction is bounded.
MAX_PDF_PAGES = 10_000
PDF_SECONDS = 120.0
DOCX_SECONDS = 120.0
MARKDOWN_HEADINGS = [(f"{'#' * level}", f"h{level}") for level in range(1, 7)]


@dataclass(frozen=True)
class Section:
    """A run of text that shares one page and one heading path."""

    text: str
    page: int | None = None
    heading: str | None = None


@dataclass(frozen=True)
class Document:
    name: str
    kind: str  # txt | md | docx | pdf
    sections: list[Section]
    pages: int | None = None  # PDFs only


def safe_file_name(name: str) -> str:
    """The last path component, without control or path characters; '../../x.txt' -> 'x.txt'."""
    base = PurePosixPath(unicodedata.normalize("NFC", name).replace("\\", "/")).name
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C")
    base = re.sub(r'[<>:"/|?*]', "_", base).strip().lstrip(".").strip()
    if not base:
        raise InvalidRequest(f"the file name {name!r} has no usable characters", PARAM)
    if len(base) > MAX_NAME_CHARS:
        stem, dot, ext = base.rpartition(".")
        keep_ext = bool(dot) and 0 < len(ext) < 16
        base = f"{stem[: MAX_NAME_CHARS - len(ext) - 1]}.{ext}" if keep_ext else base[:MAX_NAME_CHARS]
    return base


def file_kind(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    kind = KINDS.get(suffix)
    if kind is None:
        accepted = ", ".join(sorted(KINDS))
        shown = suffix or "(none)"
        raise UnsupportedMedia(f"{name}: unsupported file type {shown}; accepted: {accepted}", PARAM)
    return kind


def load_document(name: str, data: bytes) -> Document:
    """Parse one uploaded file; `name` must already be a safe file name."""
    kind = file_kind(name)
    if not data:
        raise InvalidRequest(f"{name} is empty", PARAM)
    doc = LOADERS[kind](name, data)
    sections = [s for s in doc.sections if s.text.strip()]
    if not sections:
        hint = " (a scanned PDF needs OCR, which is not supported)" if kind == "pdf" else ""
        raise InvalidRequest(f"{name} contains no text{hint}", PARAM)
    return Document(doc.name, doc.kind, sections, doc.pages)


def decode_text(name: str, data: bytes) -> str:
    for bom, encoding in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise InvalidRequest(f"{name} is not valid {encoding} text", PARAM) from exc
    if b"\x00" in data[:65536]:
        raise UnsupportedMedia(f"{name} does not look like a text file (binary content)", PARAM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise UnsupportedMedia(f"{name} does not look like a text file (unknown encoding)", PARAM)
    log.info("%s decoded as %s", name, best.encoding)
    return str(best)


def _load_txt(name: str, data: bytes) -> Document:
    return Document(name, "txt", [Section(decode_text(name, data))])


def _load_md(name: str, data: bytes) -> Document:
    from langchain_text_splitters import MarkdownHeaderTextSplitter

    splitter = MarkdownHeaderTextSplitter(MARKDOWN_HEADINGS, strip_headers=False)
    parts = splitter.split_text(decode_text(name, data))
    sections = []
    for part in parts:
        path = [part.metadata[key] for _, key in MARKDOWN_HEADINGS if part.metadata.get(key)]
        text = part.page_content.replace("  \n", "\n")  # the splitter joins lines with Markdown breaks
        sections.append(Section(text, heading=" > ".join(path) or None))
    return Document(name, "md", sections)


def _check_zip(name: str, data: bytes) -> None:
    if data.startswith(OLE_MAGIC):
        raise InvalidRequest(f"{name} is password-protected (encrypted); save it without a password", PARAM)
    if not data.startswith(b"PK\x03\x04"):
        raise UnsupportedMedia(f"{name} is not a DOCX file (a DOCX is a zip archive)", PARAM)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InvalidRequest(f"{name} is a corrupt DOCX file: {exc}", PARAM) from exc
    if "word/document.xml" not in {e.filename for e in entries}:
        raise UnsupportedMedia(f"{name} is a zip archive but not a Word document", PARAM)
    total = sum(e.file_size for e in entries)
    bomb = len(entries) > MAX_ZIP_ENTRIES or total > MAX_UNZIPPED_BYTES
    bomb = bomb or any(
        e.file_size > 1 << 20 and e.file_size > MAX_ZIP_RATIO * max(e.compress_size, 1) for e in entries
    )
    if bomb:
        raise InvalidRequest(
            f"{name} inflates to {total} bytes in {len(entries)} entries: refused as a zip bomb", PARAM
        )


class _Deadline:
    """Stops a parser that runs too long, between any two steps it lets us see."""

    def __init__(self, name: str, seconds: float, what: str) -> None:
        self.name, self.seconds, self.what = name, seconds, what
        self.at = time.monotonic() + seconds

    def check(self, where: str = "") -> None:
        if time.monotonic() > self.at:
            raise TooLarge(
                f"{self.name}: {self.what} took over {self.seconds:g} s{where}; split it into smaller files",
                PARAM,
            )


def _table_text(table: Table, deadline: _Deadline) -> str:
    lines = []
    for row in table.rows:
        deadline.check()
        cells: list[str] = []
        for cell in row.cells:
            text = cell.text.strip()
            if text and (not cells or cells[-1] != text):  # merged cells repeat their text
                cells.append(text)
        if cells:
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def _load_docx(name: str, data: bytes) -> Document:
    _check_zip(name, data)
    import docx
    from docx.table import Table

    deadline = _Deadline(name, DOCX_SECONDS, "reading its text")
    sections: list[Section] = []
    headings: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        if lines:
            sections.append(Section("\n".join(lines), heading=" > ".join(headings) or None))
            lines.clear()

    try:  # python-docx raises many types on a broken package, tables included
        document = docx.Document(io.BytesIO(data))
        for block in document.iter_inner_content():
            deadline.check()
            if isinstance(block, Table):
                lines.append(_table_text(block, deadline))
                continue
            text = block.text.strip()
            level = _heading_level(block)
            if level and text:
                flush()
                headings[level - 1 :] = [text]
            if text:
                lines.append(text)
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(f"{name} is a corrupt DOCX file: {exc}", PARAM) from exc
    flush()
    return Document(name, "docx", sections)


def _heading_level(paragraph: object) -> int | None:
    style = getattr(getattr(paragraph, "style", None), "name", "") or ""
    if style == "Title":
        return 1
    match = re.fullmatch(r"Heading (\d)", style)
    return int(match.group(1)) if match else None


def _load_pdf(name: str, data: bytes) -> Document:
    if b"%PDF-" not in data[:1024]:
        raise UnsupportedMedia(f"{name} is not a PDF file (no %PDF header)", PARAM)
    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not _decrypts(reader):
            raise InvalidRequest(f"{name} is password-protected (encrypted); upload it unencrypted", PARAM)
        sections = _pdf_pages(name, reader)
    except InvalidRequest:
        raise
    except Exception as exc:  # pypdf raises many types on a broken file
        raise InvalidRequest(f"{name} is a corrupt PDF file: {exc}", PARAM) from exc
    return Document(name, "pdf", sections, pages=len(sections))


def _pdf_pages(name: str, reader: PdfReader) -> list[Section]:
    pages = reader.pages
    if len(pages) > MAX_PDF_PAGES:
        raise TooLarge(f"{name} has {len(pages)} pages; the limit is {MAX_PDF_PAGES}", PARAM)
    deadline = _Deadline(name, PDF_SECONDS, "reading its text")
    sections = []
    for i, page in enumerate(pages):
        where = f" (stopped at page {i + 1} of {len(pages)})"
        deadline.check(where)

        def each_operator(*_: object, where: str = where) -> None:  # a single page can be costly too
            deadline.check(where)

        sections.append(Section(page.extract_text(visitor_operand_before=each_operator) or "", page=i + 1))
    return sections


def _decrypts(reader: PdfReader) -> bool:
    """Many PDFs are encrypted with an empty user password: those can be read."""
    try:
        return bool(reader.decrypt(""))
    except Exception:  # an AES file without a crypto library, or a broken dictionary
        return False


LOADERS: dict[str, Callable[[str, bytes], Document]] = {
    "txt": _load_txt,
    "md": _load_md,
    "docx": _load_docx,
    "pdf": _load_pdf,
}
