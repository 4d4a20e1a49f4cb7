"""`easllm serve` flags of the batching engine map onto EngineConfig; bad values are refused."""

import os

import pytest

from easllm.cli import build_parser, configs_from


def engine_config(*flags: str):
    return configs_from(build_parser().parse_args(["serve", *flags]))[1]


def test_defaults() -> None:
    c = engine_config()
    assert (c.max_batch, c.max_batch_tokens, c.kv_size, c.ctx_size) == (16, 512, None, 8192)


@pytest.mark.parametrize("flag", ["--max-batch", "--max-num-seqs"])
def test_max_batch_and_its_vllm_spelling(flag: str) -> None:
    assert engine_config(flag, "4").max_batch == 4


def test_token_budget_and_kv_size() -> None:
    config = engine_config("--max-batch-tokens", "128", "--kv-size", "20000", "--ctx-size", "4096")
    assert (config.max_batch_tokens, config.kv_size, config.ctx_size) == (128, 20000, 4096)


@pytest.mark.parametrize(
    "flags", [["--max-batch", "0"], ["--max-batch-tokens", "0"], ["--kv-size", "8"], ["--max-batch", "x"]]
)
def test_bad_values_exit_with_usage(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", *flags])
    assert exit_.value.code == 2 and flags[0] in capsys.readouterr().err


def test_prefix_cache_is_on_unless_no_prefix_cache() -> None:
    assert engine_config().prefix_cache is True
    assert engine_config("--no-prefix-cache").prefix_cache is False


def test_omp_wait_policy_defaults_to_openmps_own_and_refuses_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert engine_config().omp_wait_policy == "auto"
    assert engine_config("--omp-wait-policy", "passive").omp_wait_policy == "passive"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--omp-wait-policy", "spin"])
    assert "--omp-wait-policy" in capsys.readouterr().err


def test_omp_wait_policy_sets_the_environment_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from easllm.engine.backends.llamacpp import set_omp_wait_policy

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    set_omp_wait_policy("auto")
    assert "OMP_WAIT_POLICY" not in os.environ  # OpenMP's own default, as llama-server
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    set_omp_wait_policy("auto")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the environment's choice stays
    set_omp_wait_policy("passive")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(ValueError, match="omp_wait_policy"):
        set_omp_wait_policy("spin")
