"""Loading and evicting Llama-3-8B-shaped models under a memory budget that fits two
(issue 4): through the daemon's own scheduler, loader and estimator.

    python bench/gpu_memory.py --root /tmp/bench [--cycles 10] [--budget 34GiB]

Three models (NF4 + double quant, NF4, bf16) are requested round-robin, so every request
loads one and evicts another. For each load: the estimate against the measured footprint;
after each eviction: GPU memory allocated against the baseline plus what stays loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bench.dummy_models import write_checkpoint  # noqa: E402
from daemon.backends.runtime import estimate_footprint, load_runtime  # noqa: E402
from daemon.config import Settings  # noqa: E402
from daemon.names import ModelName  # noqa: E402
from daemon.scheduler.policy import MemoryBudget, parse_memory  # noqa: E402
from daemon.scheduler.scheduler import Scheduler  # noqa: E402
from daemon.server.app import build_catalog  # noqa: E402

MIB = 1 << 20
MODELS = {"nf4-dq": "{mode: nf4, double_quant: true, compute_dtype: bfloat16}",
          "nf4": "{mode: nf4, double_quant: false, compute_dtype: bfloat16}",
          "bf16": "{mode: none, compute_dtype: bfloat16}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--budget", default="34GiB")
    args = parser.parse_args()
    root = Path(args.root)
    checkpoint = write_checkpoint(root / "llama3-8b-random")
    mf = root / "modelfiles-mem"
    mf.mkdir(parents=True, exist_ok=True)
    (mf / "mem.yaml").write_text("tags:\n" + "".join(
        f"  {v}:\n    source: {{path: '{checkpoint}'}}\n    quantization: {q}\n" for v, q in MODELS.items()))
    settings = Settings.from_env({}, models_dir=root / "store", user_modelfiles_dir=mf, device="cuda",
                                 num_parallel=4, context_length=4096, gpu_memory=args.budget)
    catalog = build_catalog(settings)
    models = [catalog.resolve(ModelName.parse(f"mem:{v}")) for v in MODELS]
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    loads, evictions = [], []
    holder: list = []  # the scheduler, once it exists

    class Measured:
        def __init__(self, runtime):
            self.runtime = runtime

        def __getattr__(self, name):
            return getattr(self.runtime, name)

        @property
        def size_bytes(self):
            return self.runtime.size_bytes

        @property
        def size_vram(self):
            return self.runtime.size_vram

        def close(self):
            name = self.runtime.resolved.name.display
            self.runtime.close()
            torch.cuda.synchronize()
            staying = sum(r.size_bytes for r in holder[0].residents()) if holder else 0
            evictions.append((name, torch.cuda.memory_allocated(), baseline + staying))

    def loader(resolved, num_ctx):
        estimate = estimate_footprint(resolved, settings, num_ctx)
        runtime = load_runtime(resolved, settings, num_ctx)
        loads.append((resolved.name.display, estimate, runtime.size_bytes))
        return Measured(runtime)

    budget = MemoryBudget(parse_memory(args.budget, torch.cuda.mem_get_info()[1]), "cuda:0", args.budget)
    scheduler = Scheduler(settings, loader, budget, lambda r, n: estimate_footprint(r, settings, n))
    holder.append(scheduler)
    residents_after: list[tuple[str, int, int]] = []

    async def run() -> None:
        for i in range(args.cycles):
            model = models[i % len(models)]
            async with scheduler.acquire(model, None, None) as runtime:
                assert runtime is not None
            held = sum(r.size_bytes for r in scheduler.residents())
            residents_after.append((model.name.display, len(scheduler.residents()), held))
        await scheduler.close()

    asyncio.run(run())
    print(f"\nbudget {budget.capacity / (1 << 30):.1f} GiB; baseline {baseline / MIB:.0f} MiB allocated before any model")
    print(f"{'load':<6}{'model':<14}{'estimate GiB':>13}{'measured GiB':>13}{'error':>8}")
    for i, (name, estimate, measured) in enumerate(loads):
        print(f"{i + 1:<6}{name:<14}{estimate / (1 << 30):>13.2f}{measured / (1 << 30):>13.2f}"
              f"{100 * (estimate - measured) / measured:>7.1f}%")
    print(f"\n{'eviction':<10}{'model':<14}{'allocated MiB':>14}{'expected MiB':>14}{'excess MiB':>12}")
    # expected after an eviction: the baseline plus the measured sizes of the models still loaded
    for i, (name, allocated, expected) in enumerate(evictions):
        print(f"{i + 1:<10}{name:<14}{allocated / MIB:>14.0f}{expected / MIB:>14.0f}{(allocated - expected) / MIB:>12.0f}")
    torch.cuda.synchronize()
    final = torch.cuda.memory_allocated()
    print(f"\nafter unloading everything: {final / MIB:.0f} MiB allocated, {(final - baseline) / MIB:+.0f} MiB "
          "against the baseline")


if __name__ == "__main__":
    main()
