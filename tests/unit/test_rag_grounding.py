"""The grounded prompt names the question's language, so that a small model answers in it."""

from easllm.rag.grounding import grounded_completion, grounded_question, question_language
from easllm.rag.splitter import Chunk
from easllm.rag.store import Hit


def test_the_language_is_told_from_the_script() -> None:
    assert question_language("デプロイにはどのくらいかかりますか？") == "ja"
    assert question_language("東京のEASで展開する") == "ja"  # kana decides
    assert question_language("公司年度旅行去哪里？") == "zh"
    assert question_language("배포는 얼마나 걸리나요?") == "ko"
    assert question_language("How long does it take?") is None


def test_a_japanese_question_is_told_to_be_answered_in_japanese() -> None:
    hits = [Hit(Chunk("page.txt", "モデルの展開には約5分かかります。", None, "LLMをEASにデプロイ"), 1.0, 0)]
    prompt = grounded_question("デプロイにはどのくらいかかりますか？", hits)
    assert "Answer in Japanese. 日本語で答えてください。" in prompt
    assert "[1] (page.txt, LLMをEASにデプロイ)\nモデルの展開には約5分かかります。" in prompt
    assert "请用中文回答" in grounded_question("部署需要多长时间？", hits)
    assert "Answer in the language of the question." in grounded_question("How long?", hits)
    no_match = grounded_completion("デプロイ時間は？", [])
    assert "No excerpt" in no_match and "日本語で答えてください" in no_match
