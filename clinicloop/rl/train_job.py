"""The training step of `rl refresh`, in its own process or in N data-parallel processes.

`rl refresh` trains in its own process by default (`train(spec, 1)`). With N > 1 processes (one
per GPU of a multi-GPU node) only this step is distributed: it runs
`accelerate launch --multi_gpu --num_processes N -m clinicloop.rl.train_job SPEC.json`, and every
rank trains on the same spec and rows as TRL's data-parallel GRPO, while prompts, evaluation,
publishing and the swap stay in the one refresh process. Only the main rank writes the adapter,
`train.json` and `dataset.jsonl` (`train_grpo`), into the output directory the refresh publishes
from, as an in-process run would.

Accelerate's `--cpu` launcher starts one process whatever `--num_processes` says (several CPU
processes need MPI), so the ranks are always started by torchrun (`--multi_gpu`); where the
training runs on the CPU (`PaperGRPOConfig.use_cpu`, or no CUDA) the ranks talk over gloo, which
is how the tests run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.grpo import TrainResult
from clinicloop.rl.runfiles import read_rows
from clinicloop.rl.stages import Endpoint, rubric_stage, rule_stage

#: Lines of a failed launch's stderr its error carries (torchrun's summary with the rank's
#: traceback, which `record` writes for it).
ERROR_TAIL_LINES = 30


class TrainJobFailed(RuntimeError):
    """A distributed training run exited non-zero; the message ends with its stderr's tail."""


class TrainSpec(BaseModel):
    """Everything one training run needs, as the refresh's train step passes it to each rank."""

    stage: Literal["rule", "rubric"]
    policy_hf: Path
    output_dir: Path
    grpo: PaperGRPOConfig
    rows: Path
    init_adapter: Path | None = None
    judge: Endpoint
    models_dir: Path
    labels: dict[str, bool] = Field(
        default_factory=dict, description="Reviewers' labels by verdict key: the reward takes "
        "them instead of the judge's verdicts.")

    def run(self) -> TrainResult:
        """Train in this process (one rank of a launch, or the whole run)."""
        rows = read_rows(self.rows)
        if self.stage == "rule":
            return rule_stage(self.policy_hf, self.output_dir, self.grpo, rows=rows,
                              init_adapter=self.init_adapter)
        return rubric_stage(self.policy_hf, self.output_dir, self.judge, self.grpo, rows=rows,
                            models_dir=self.models_dir, init_adapter=self.init_adapter,
                            labels=self.labels)


def launch_command(spec_file: Path, processes: int) -> list[str]:
    """`accelerate launch` of this module on `spec_file` in `processes` ranks, from this Python
    environment; every launch option given, so no accelerate config file or default decides."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no",  # the trainer's own `bf16` option decides
            "--dynamo_backend", "no",
            "--main_process_port", "0",  # a free port: jobs on one node never collide
            "-m", __name__, str(spec_file)]


def train(spec: TrainSpec, processes: int = 1) -> None:
    """Run `spec` in this process, or in `processes` ranks through `accelerate launch` (their
    stderr passed through); a launch that exits non-zero raises `TrainJobFailed`."""
    if processes == 1:
        spec.run()
        return
    # The spec names the judge's key: it lives in a private temporary directory, never the run's.
    with tempfile.TemporaryDirectory(prefix="clinicloop-train-") as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(spec.model_dump_json(), encoding="utf-8")
        tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
        with subprocess.Popen(launch_command(spec_file, processes), stderr=subprocess.PIPE,
                              text=True, errors="replace") as job:
            assert job.stderr is not None
            for line in job.stderr:
                sys.stderr.write(line)
                tail.append(line)
        if job.returncode != 0:
            raise TrainJobFailed(f"training in {processes} processes exited with "
                                 f"{job.returncode}:\n" + "".join(tail).rstrip())


def main(argv: list[str] | None = None) -> None:
    """One rank: `python -m clinicloop.rl.train_job SPEC.json`, as `accelerate launch` runs it."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import record

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m clinicloop.rl.train_job SPEC.json")
    spec = TrainSpec.model_validate_json(Path(args[0]).read_text(encoding="utf-8"))
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # This rank's GPU before anything touches CUDA: the 4-bit base, the peak-memory count
        # and the trainer then all use it, not GPU 0.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # `record` hands a rank's traceback to torchrun, whose failure summary then shows it.
    record(spec.run)()


if __name__ == "__main__":
    main()
