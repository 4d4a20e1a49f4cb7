"""What the WebUI reads back from the page and shows: rounds, controls, sources, file rows."""

from easllm.config import SamplingDefaults
from easllm.engine.types import Usage
from easllm.rag.store import StoredFile
from easllm.serving.prompts import Source
from easllm.webui.messages import (
    Controls,
    conversation,
    default_controls,
    file_rows,
    human_size,
    rounds,
    sources_message,
    stats_line,
)


def test_rounds_pair_user_and_assistant_and_skip_sources_notes() -> None:
    chat = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer one"},
        sources_message([Source("a.md", "text", 0.9)]),
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "answer two", "metadata": None},
        {"role": "user", "content": "unanswered"},
    ]
    assert rounds(chat) == [("first", "answer one"), ("second", "answer two")]
    conv = conversation("third", chat, "  Be brief.  ")
    assert conv.prompt == "third" and conv.system_prompt == "Be brief."
    assert conv.history == (("first", "answer one"), ("second", "answer two"))


def test_an_answer_split_over_two_messages_is_one_round() -> None:
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "part one, "},
        {"role": "assistant", "content": "part two"},
    ]
    assert rounds(chat) == [("q", "part one, part two")]


def test_controls_become_sampling_params_within_range() -> None:
    s = Controls("", 64.0, 0.0, 0.9, 40.0).sampling()
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k) == (64, 0.0, 0.9, 40)
    assert s.greedy
    odd = Controls("", 0, -1, 0, -3).sampling()
    assert (odd.max_new_tokens, odd.temperature, odd.top_k) == (1, 0.0, 0) and 0 < odd.top_p <= 1
    d = default_controls(SamplingDefaults(max_new_tokens=300, temperature=0.7, top_k=None, top_p=None))
    assert (d.max_new_tokens, d.temperature, d.top_p, d.top_k) == (300, 0.7, 1.0, 0)


def test_sources_note_names_files_and_pages_and_quotes_excerpts() -> None:
    sources = [
        Source("manual.pdf", "The door code is 7351.", 0.81234, page=2),
        Source("manual.pdf", "Opening hours are 8 to 5.", 0.5, page=1),
        Source("notes_*draft*.md", "x " * 400, 0.4, heading="Setup > Install"),
    ]
    note = sources_message(sources)
    assert note["metadata"]["title"] == "Sources: manual.pdf (p. 2), manual.pdf (p. 1), notes_*draft*.md"
    body = note["content"]
    assert "1. **manual.pdf** · page 2 · score 0.81" in body and "> The door code is 7351." in body
    assert "notes\\_\\*draft\\*.md" in body and "Setup \\> Install" in body  # Markdown is escaped
    assert body.count("…") == 1  # the long excerpt is cut
    empty = sources_message([])
    assert empty["metadata"]["title"].startswith("Sources: none")


def test_stats_line_and_file_rows() -> None:
    line = stats_line(Usage(prompt_tokens=12, completion_tokens=30), 3.0, 0.1, "length")
    assert line == (
        "30 tokens in 3.0 s (first after 0.1 s, 10.0 tokens/s) · prompt 12 tokens · stopped at max new tokens"
    )
    one = stats_line(Usage(prompt_tokens=1, completion_tokens=1), 0.5, 0.5, "stop")
    assert one == "1 token in 0.5 s (first after 0.5 s, 0.0 tokens/s) · prompt 1 token · finished"
    assert stats_line(None, 1.0, 1.0, None) == ""
    again = stats_line(Usage(prompt_tokens=40, completion_tokens=1, cached_tokens=31), 0.5, 0.5, "stop")
    assert "prompt 40 tokens (31 cached) · finished" in again  # the prefix cache's share
    files = [
        StoredFile("b.pdf", "pdf", 3 * 1024 * 1024, 9, 4, 0.0, "x"),
        StoredFile("A.md", "md", 100, 2, None, 0.0, "y"),
    ]
    rows = file_rows(files)
    assert [r[0] for r in rows] == ["A.md", "b.pdf"]
    assert rows[0][1:5] == ["MD", "100 B", 2, ""] and rows[1][1:5] == ["PDF", "3.0 MB", 9, 4]
    assert human_size(2048) == "2.0 KB"
