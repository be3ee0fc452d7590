"""Run the shared scenario scripts through ``gradwatch run``, once per test session.

Each script runs in this process through the CLI, while an independent reference
made of torch's own global hooks counts the optimizer steps and notes the first
module whose output is non-finite.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook
from typer.testing import CliRunner

from gradwatch.cli import app


@dataclass
class ScenarioRun:
    name: str
    exit_code: int
    output: str
    report: dict
    run_dir: Path
    optimizer_steps: int
    optimizers: int
    first_nonfinite: tuple[int, str] | None

    @property
    def rounds(self) -> int:
        """Steps as gradwatch counts them: one round in which every optimizer stepped."""
        return self.optimizer_steps // max(self.optimizers, 1)


def _module_name(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> str:
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer else set()
    for obj in gc.get_objects():
        if not issubclass(type(obj), nn.Module):  # not isinstance: lazy proxies warn when probed
            continue
        try:
            if wanted <= {id(p) for p in obj.parameters()}:
                for name, m in obj.named_modules():
                    if m is module and name:
                        return name
        except Exception:  # noqa: BLE001 - half-built or compiled wrappers; not the model we want
            continue
    return type(module).__name__


def run_scenario(script: Path, out_dir: Path) -> ScenarioRun:
    state = {"steps": 0, "first": None, "opt": None, "ids": set()}

    def count(opt, args, kwargs):
        state["steps"] += 1
        state["opt"] = opt
        state["ids"].add(id(opt))

    def check(module, args, output):
        if state["first"] is None and torch.is_grad_enabled() and module.training:
            first = output[0] if isinstance(output, tuple) else output
            if isinstance(first, torch.Tensor) and not torch.isfinite(first).all():
                state["first"] = (state["steps"], module)

    handles = [register_optimizer_step_post_hook(count), register_module_forward_hook(check)]
    run_dir = out_dir / script.stem
    report_file = out_dir / f"{script.stem}.json"
    try:
        result = CliRunner().invoke(
            app,
            ["run", "--out", str(run_dir), "--json", str(report_file), str(script)],
            catch_exceptions=False,
        )
    finally:
        for h in handles:
            h.remove()
    first = state["first"]
    named = (first[0], _module_name(first[1], state["opt"])) if first else None
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return ScenarioRun(
        script.name,
        result.exit_code,
        result.output,
        report,
        run_dir,
        state["steps"],
        len(state["ids"]),
        named,
    )
