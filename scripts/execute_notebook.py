"""Execute one notebook headless with nbclient, in place or into a folder: what `tasks.py setup` and `tasks.py notebooks`
run for each notebook (with the project's venv Python).

    python scripts/execute_notebook.py notebooks/08_mixtral_model.ipynb --output-dir build/executed

Why not `jupyter nbconvert --execute`: it drives the same nbclient, whose asyncio ZMQ sockets can miss the wake-up
for a message that is already there (seen on notebook 08, right after the `interact` widget cell, in about half the
runs): the reply then sits unread until the cell timeout runs out, 20 minutes, before the run goes on. Here every
wait on the kernel's channels polls in slices of at most one second, so a missed wake-up costs at most a second.
Nothing else differs: the kernel runs in the notebook's folder, and a cell error stops the run with its traceback.
The kernel talks over IPC (Unix sockets in Jupyter's runtime dir, beside its connection file), not TCP on localhost:
no port is opened, and ipykernel has no cause to warn that TCP runs without encryption (Windows, which has no IPC
transport, keeps TCP).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from queue import Empty

import nbformat
from jupyter_core.paths import jupyter_runtime_dir
from nbclient import NotebookClient
from traitlets.config import Config

SLICE_S = 1.0      # the longest a message that has arrived can wait unseen


def kernel_config() -> Config:
    """The kernel manager's settings: IPC where the OS has it, its socket files named by an absolute path in Jupyter's
    runtime dir (a bare name would be taken relative to each process's own folder, and the kernel runs in the
    notebook's, so the two sides would not meet). One kernel per run of this script: the pid keeps names apart."""
    if os.name == "nt":
        return Config()
    runtime = Path(jupyter_runtime_dir())
    runtime.mkdir(parents=True, exist_ok=True)
    return Config({"KernelManager": {"transport": "ipc", "ip": str(runtime / f"nbclient-{os.getpid()}-ipc")}})


def poll_in_slices(channel) -> None:
    """Make `channel.get_msg(timeout)` poll its socket at most SLICE_S seconds at a time, up to the same deadline."""
    get_msg = channel.get_msg

    async def sliced_get_msg(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(timeout=min(SLICE_S, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = sliced_get_msg


class SlicedPollingClient(NotebookClient):
    """nbclient's NotebookClient whose shell and iopub channels poll in slices (see the module docstring)."""

    async def async_start_new_kernel_client(self):
        kernel_client = await super().async_start_new_kernel_client()
        poll_in_slices(kernel_client.shell_channel)
        poll_in_slices(kernel_client.iopub_channel)
        return kernel_client


def execute(path: Path, output_dir: Path | None, timeout: int) -> Path:
    notebook = nbformat.read(path, as_version=4)
    client = SlicedPollingClient(notebook, timeout=timeout, kernel_name="python3",
                                 resources={"metadata": {"path": str(path.parent)}},
                                 config=kernel_config())
    start = time.perf_counter()
    client.execute()
    target = path if output_dir is None else output_dir / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, target)
    print(f"executed {path} -> {target} in {time.perf_counter() - start:.0f} s", flush=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--output-dir", type=Path, default=None, help="write there (default: in place)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds a cell may run (default 1200)")
    args = parser.parse_args()
    execute(args.notebook, args.output_dir, args.timeout)


if __name__ == "__main__":
    main()
