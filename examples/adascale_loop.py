"""AdaScale in a plain accelerate loop: the LR follows the measured gradient noise instead of a fixed scaling rule.

Two CPU processes over gloo, 2 accumulation steps (S = 2 x 2 x 8 / 8 = 4 base batches per update):

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/adascale_loop.py \\
        --base-batch-size 8 --per-device-batch-size 8 --gradient-accumulation-steps 2 --epochs 2

The base run is SGD at ``--base-batch-size`` with ``--base-lr``, a linear warmup of ``--base-warmup-epochs`` and a
linear decay over ``--epochs``; AdaScale trains at the larger batch until its scale-invariant progress reaches that
run's length. ``--adascale diagnostics`` keeps the base run's LR schedule unscaled and only measures. The
gradient noise scale B_simple, the gain and the efficiency are printed every ``--log-every`` updates.

``--stats-log FILE`` appends one JSON line per update and process (LR used, gain, progress, the update's raw
estimates); ``--gradients-out FILE`` saves every micro-batch's own mean gradient, computed separately from the
training step, so the statistics can be checked from the same gradients in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accelerate_loop import synthetic_regression

from legw_hf import LegwConfig, Polynomial, exit_process
from legw_hf.integrations.accelerate import create_adascale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adascale", choices=("gain", "sqrt_gain", "diagnostics"), default="gain")
    parser.add_argument("--base-batch-size", type=int, default=8, help="batch the base run's LR was tuned at")
    parser.add_argument("--base-lr", type=float, default=0.05)
    parser.add_argument("--base-warmup-epochs", type=float, default=0.25)
    parser.add_argument("--per-device-batch-size", type=int, default=8)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=2, help="the base run's length")
    parser.add_argument("--dataset-size", type=int, default=256)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--stats-log", help="append one JSON line per update to FILE.rank<N>")
    parser.add_argument("--gradients-out", help="torch.save every micro-batch's own gradient to FILE.rank<N>")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def describe(logs: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in logs.items())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer_class = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), lr=args.base_lr)
    loader = DataLoader(
        synthetic_regression(args.dataset_size, args.seed), batch_size=args.per_device_batch_size, shuffle=True
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    base_run = LegwConfig(
        base_batch_size=args.base_batch_size,
        base_lr=args.base_lr,
        base_warmup_epochs=args.base_warmup_epochs,
        rule="none",
        decay=Polynomial(power=1.0),
    )
    if args.adascale == "diagnostics":
        adascale = create_adascale(
            accelerator, optimizer, model, loader, mode="diagnostics", base_batch_size=args.base_batch_size
        )
    else:
        adascale = create_adascale(
            accelerator, optimizer, model, loader, mode=args.adascale, config=base_run, num_epochs=args.epochs
        )
        accelerator.print(
            f"AdaScale {args.adascale}, S = {adascale.noise.scale:g}: {adascale.scheduler.schedule_description}"
        )

    unwrapped = accelerator.unwrap_model(model)
    names = [name for name, _ in unwrapped.named_parameters()]
    rank = accelerator.process_index
    log = open(f"{args.stats_log}.rank{rank}", "w") if args.stats_log else None
    micro_gradients: list[list[torch.Tensor]] = [[]]

    updates, epoch = 0, 0
    while not adascale.finished and (args.adascale != "diagnostics" or epoch < args.epochs):
        model.train()
        loader.set_epoch(epoch)
        for features, targets in loader:
            with accelerator.accumulate(model):
                if args.gradients_out:  # the micro-batch's own gradient, through copies the hooks do not see
                    copies = {n: p.detach().clone().requires_grad_() for n, p in unwrapped.named_parameters()}
                    outputs = torch.func.functional_call(unwrapped, copies, (features,))
                    loss = torch.nn.functional.mse_loss(outputs.squeeze(-1), targets)
                    grads = torch.autograd.grad(loss, [copies[n] for n in names])
                    micro_gradients[-1].append(torch.cat([g.flatten() for g in grads]))
                adascale.backward(torch.nn.functional.mse_loss(model(features).squeeze(-1), targets))
                lr_used = optimizer.param_groups[0]["lr"]
                optimizer.step()
                progress_before = adascale.progress
                adascale.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                updates += 1
                if log:
                    row = {
                        "update": updates - 1,
                        "lr": lr_used,
                        "gain": adascale.noise.gain,
                        "progress": progress_before,
                    }
                    row |= {"recorded": adascale.noise.recorded, **adascale.noise.last}
                    log.write(json.dumps(row) + "\n")
                micro_gradients.append([])
                if updates % args.log_every == 0:
                    accelerator.print(
                        f"update {updates}: " + ", ".join(f"{k} {v:.4g}" for k, v in adascale.logs().items())
                    )
            if adascale.finished:
                break
        epoch += 1
    accelerator.print(f"done after {updates} updates: {describe(adascale.logs())}")
    if log:
        log.close()
    if args.gradients_out:
        torch.save([torch.stack(g) for g in micro_gradients if g], f"{args.gradients_out}.rank{rank}")
    accelerator.end_training()


if __name__ == "__main__":
    exit_process(main())
