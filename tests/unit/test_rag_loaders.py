"""Loaders: real TXT/MD/DOCX/PDF bytes -> sections with pages and heading paths; every bad file a 4xx."""

import io
import zipfile

import pytest

from easllm.errors import InvalidRequest, UnsupportedMedia
from easllm.rag.loaders import load_document, safe_file_name
from tests.rag_samples import (
    DOCX_FACT,
    FACTS_JA,
    FACTS_MD,
    FACTS_ZH,
    PDF_FACT_PAGE_2,
    docx_bytes,
    encrypted_pdf_bytes,
    pdf_bytes,
    zip_bomb_docx,
)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "shift_jis", "euc-jp"], ids=lambda e: e)
def test_japanese_text_in_common_encodings_decodes(encoding: str) -> None:
    doc = load_document("notes.txt", FACTS_JA.encode(encoding))
    assert doc.kind == "txt" and doc.sections[0].text == FACTS_JA


def test_chinese_gb18030_text_decodes() -> None:
    assert load_document("trip.txt", FACTS_ZH.encode("gb18030")).sections[0].text == FACTS_ZH


def test_markdown_sections_keep_their_heading_path() -> None:
    doc = load_document("guide.md", FACTS_MD.encode())
    by_heading = {s.heading: s.text for s in doc.sections}
    assert set(by_heading) == {"Office guide > Parking", "Office guide > Lunch"}
    assert "bay Q17" in by_heading["Office guide > Parking"]
    assert "okonomiyaki" in by_heading["Office guide > Lunch"]
    assert "okonomiyaki" not in by_heading["Office guide > Parking"]


def test_markdown_code_fences_are_not_headings() -> None:
    text = "# Setup\n\n```bash\n# not a heading\npip install x\n```\n"
    doc = load_document("setup.md", text.encode())
    assert [s.heading for s in doc.sections] == ["Setup"]
    assert "# not a heading" in doc.sections[0].text


def test_docx_paragraphs_tables_and_headings_in_order() -> None:
    data = docx_bytes(
        "Facilities", ["Intro.", DOCX_FACT], [["Room", "Floor"], ["Server room", "B2"]], subheading="Power"
    )
    doc = load_document("facilities.docx", data)
    power = next(s for s in doc.sections if s.heading == "Facilities > Power")
    assert DOCX_FACT in power.text
    assert "Server room | B2" in power.text
    assert power.text.index("Intro.") < power.text.index(DOCX_FACT) < power.text.index("Server room")


def test_pdf_text_is_kept_per_page() -> None:
    doc = load_document("manual.pdf", pdf_bytes([["Cover page"], ["Security", PDF_FACT_PAGE_2]]))
    assert doc.pages == 2
    assert [s.page for s in doc.sections] == [1, 2]
    assert PDF_FACT_PAGE_2 in doc.sections[1].text and "Cover page" in doc.sections[0].text


def test_pdf_with_an_empty_user_password_is_read() -> None:
    doc = load_document("open.pdf", encrypted_pdf_bytes([["Readable text"]], password=""))
    assert "Readable text" in doc.sections[0].text


def _refusal(name: str, data: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        load_document(name, data)
    assert caught.value.param == "files"
    assert name in caught.value.message
    return caught.value


@pytest.mark.parametrize(
    ("name", "data", "status", "words"),
    [
        ("slides.pptx", b"PK\x03\x04whatever", 415, "unsupported file type .pptx"),
        ("noext", b"hello", 415, "unsupported file type"),
        ("empty.txt", b"", 400, "is empty"),
        ("blank.md", b"  \n\n \t\n", 400, "no text"),
        ("binary.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00" * 10, 415, "binary"),
        ("fake.pdf", b"hello, I am text", 415, "not a PDF"),
        ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog", 400, "corrupt PDF"),
        ("fake.docx", b"plain text pretending", 415, "not a DOCX"),
        ("locked.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 512, 400, "password-protected"),
        ("truncated.docx", b"PK\x03\x04\x14\x00" + b"\0" * 40, 400, "corrupt DOCX"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "",
)
def test_bad_files_are_refused_with_a_status_naming_the_file(
    name: str, data: bytes, status: int, words: str
) -> None:
    err = _refusal(name, data)
    assert err.status == status and words in err.message


def test_encrypted_pdf_is_refused() -> None:
    err = _refusal("secret.pdf", encrypted_pdf_bytes([["hidden"]]))
    assert err.status == 400 and "password-protected" in err.message


def test_scanned_pdf_without_text_is_refused() -> None:
    err = _refusal("scan.pdf", pdf_bytes([[], []]))
    assert "no text" in err.message and "OCR" in err.message


def test_zip_bomb_docx_is_refused_before_inflating() -> None:
    err = _refusal("bomb.docx", zip_bomb_docx())
    assert err.status == 400 and "zip bomb" in err.message


def test_zip_that_is_not_a_word_document_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    err = _refusal("archive.docx", buffer.getvalue())
    assert isinstance(err, UnsupportedMedia) and "not a Word document" in err.message


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("../../etc/passwd.txt", "passwd.txt"),
        ("/abs/path/report.pdf", "report.pdf"),
        ("..\\..\\windows\\evil.md", "evil.md"),
        ("..hidden.txt", "hidden.txt"),
        ("bad\x00na\nme.txt", "badname.txt"),
        ('what?<>|"*.md', "what______.md"),
        ("会議メモ.txt", "会議メモ.txt"),
    ],
)
def test_file_names_are_made_path_safe(raw: str, safe: str) -> None:
    assert safe_file_name(raw) == safe


def test_long_names_keep_their_extension() -> None:
    name = safe_file_name("x" * 500 + ".pdf")
    assert len(name) == 200 and name.endswith(".pdf")


@pytest.mark.parametrize("raw", ["", "../..", "/", "\x00\x01"])
def test_names_without_usable_characters_are_refused(raw: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        safe_file_name(raw)
    assert caught.value.param == "files"
