"""Tests never touch the network or the user's services: a private EASLLM_HOME per session,
sharing only the assembled bundled models (read-only, ~0.7 GB, assembled once per machine)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# the suite shares its cores with the servers it starts: llama.cpp's OpenMP threads must not spin
# (easllm's --omp-wait-policy auto leaves the environment's choice in force)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _private_home() -> None:
    shared_models = Path(os.environ.get("EASLLM_HOME") or Path.home() / ".cache" / "easllm") / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="easllm-test-home-"))
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    os.environ["EASLLM_HOME"] = str(home)
    atexit.register(shutil.rmtree, home, ignore_errors=True)  # rmtree unlinks, never follows, the link


_private_home()
