"""The grounded prompt names the question's language, so that a small model answers in it."""

from easllm.rag.grounding import grounded_completion, grounded_system, question_language
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
    system = grounded_system("", hits, "デプロイにはどのくらいかかりますか？")
    assert system.startswith("Answer the question using only the numbered excerpts")
    assert "Answer in Japanese. 日本語で答えてください。" in system
    assert system.endswith("[1] (page.txt, LLMをEASにデプロイ)\nモデルの展開には約5分かかります。")
    assert "请用中文回答" in grounded_system("", hits, "部署需要多长时间？")
    assert "Answer in the language of the question." in grounded_system("", hits, "How long?")
    no_match = grounded_completion("デプロイ時間は？", [])
    assert "No excerpt" in no_match and "日本語で答えてください" in no_match
    assert no_match.endswith("Question: デプロイ時間は？\n\nAnswer:")


def test_the_deployments_system_prompt_comes_first_and_tools_get_their_own_instruction() -> None:
    hits = [Hit(Chunk("page.txt", "Deploying takes about 5 minutes.", None, None), 1.0, 0)]
    system = grounded_system("Be brief.", hits, "How long?")
    assert system.startswith("Be brief.\n\nAnswer the question using only")
    with_tools = grounded_system("Be brief.", hits, "How long?", with_tools=True)
    assert with_tools.startswith("Be brief.\n\nAnswer using the numbered excerpts")
    assert "the tools you are given" in with_tools
    assert "use the tools you are given" in grounded_system("", [], "How long?", with_tools=True)
