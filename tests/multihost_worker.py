"""One process of test_multihost: the train CLI, unchanged, plus a record of what it loaded.

    python tests/multihost_worker.py RECORD.json --config CONFIG --workdir DIR [--config.K=V ...]

Runs `python -m facenet_jax.train` in this process (same flags, same code path). The only
addition is a wrapper around `PKSampler.host_batch` that notes, for every step, which rows this
process loaded; at exit, RECORD.json holds those notes with the process and device counts that
JAX reported, so the test can check that each process loaded only its part of the batch.
"""

from __future__ import annotations

import json
import pathlib
import runpy
import sys
from typing import Any


def main() -> int:
    record_path = pathlib.Path(sys.argv[1])
    from facenet_jax.data.sampler import PKSampler  # imports only: no device is touched yet

    loaded: list[dict[str, Any]] = []
    host_batch = PKSampler.host_batch

    def recording_host_batch(self: PKSampler, step: int, process_index: int,
                             process_count: int):
        images, labels = host_batch(self, step, process_index, process_count)
        loaded.append({"step": step, "process_index": process_index,
                       "process_count": process_count, "images_shape": list(images.shape),
                       "labels": labels.tolist(), "global_batch_size": self.batch_size})
        return images, labels

    PKSampler.host_batch = recording_host_batch
    sys.argv = ["facenet_jax.train", *sys.argv[2:]]
    code: Any = 0
    try:
        runpy.run_module("facenet_jax.train", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:  # absl's app.run always exits; None means success
        code = exit_.code or 0
    import jax

    record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "local_device_count": jax.local_device_count(),
              "device_count": jax.device_count(),
              "loaded": sorted(loaded, key=lambda row: row["step"])}
    record_path.write_text(json.dumps(record))
    return code if isinstance(code, int) else 1  # a message string: failure


if __name__ == "__main__":
    sys.exit(main())
