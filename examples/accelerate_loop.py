"""A plain accelerate training loop with a LEGW schedule.

Two CPU processes over gloo (``--cpu`` would start only one: see docs/howto/accelerate.md):

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py \\
        --base-batch-size 8 --per-device-batch-size 8 --gradient-accumulation-steps 2 --epochs 3 --optimizer lamb

Under a DeepSpeed plugin (``accelerate launch --use_deepspeed --deepspeed_config_file ds.json``) LAMB and LARS
learn DeepSpeed's partitions when the scheduler is created; with ``--optimizer lamb`` (the nvidia preset, which
pre-normalises gradients) the config must set ``"gradient_clipping": 0``.

Trains a small regression MLP on a synthetic dataset with SGD, LAMB or LARS (``--optimizer``). With
``--lr-log FILE`` every process appends one JSON line per optimizer update with the LR that update used, which
the tests compare with the plan.

``--stop-after N --output-dir DIR`` stops after N updates with ``save_state``; ``--resume-from DIR`` continues from
such a state, also with another number of processes: when that changes the global batch, the LEGW plan is the new
batch's and the progress carries over in epochs; the loop picks the data up at that point of the epoch.

``--batch-ramp 16@0,32@1,64@2`` grows the global batch during the run (16 from the start, 32 from epoch 1, 64 from
epoch 2): each update accumulates the micro-batches of its stage's batch and takes LEGW's LR for that batch
(``legw_hf.ramp``), also under a DeepSpeed plugin (ZeRO 1-3), where the engine's accumulation is set for every
update; the log lines then also carry the update's batch and the samples this process took.

``--batch-ramp auto --max-batch 64`` decides the ramp during the run instead: from the dataloader's global batch (or
``--start-batch``), the batch doubles while doubling it is at least ``--ramp-efficiency`` efficient by the measured
gradient noise scale, ``--ramp-patience`` updates after the start and after each change (``legw_hf.ramp.AutoRamp``).
``--decision-log FILE`` keeps the changes as JSON lines; the log lines carry the noise estimates of every update.
``--target-noise`` is the noise on the regression targets: the larger, the larger the noise scale.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset

from legw_hf import Lamb, Lars, LegwConfig, Polynomial, decay_param_groups, exit_process
from legw_hf.integrations.accelerate import AcceleratorAutoRamp, create_legw_scheduler, ramped_updates
from legw_hf.ramp import AutoRamp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-batch-size", type=int, default=8, help="global batch the LR was tuned at")
    parser.add_argument("--base-lr", type=float, default=0.05)
    parser.add_argument("--base-warmup-epochs", type=float, default=0.25)
    parser.add_argument("--per-device-batch-size", type=int, default=8)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--dataset-size", type=int, default=250)
    parser.add_argument("--lr-log", help="append the LR of every update as JSON lines to this file")
    parser.add_argument("--output-dir", help="save_state here at the end (or at --stop-after)")
    parser.add_argument("--stop-after", type=int, help="stop after this many updates")
    parser.add_argument("--resume-from", help="load_state from here first (saved at any number of processes)")
    parser.add_argument("--parameters-out", help="write the trained model's state dict here (torch.save)")
    parser.add_argument("--optimizer", choices=("sgd", "lamb", "lars"), default="sgd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-ramp", help="grow the global batch: batch@epoch stages, e.g. 16@0,32@1,64@2, or auto (--max-batch)"
    )
    parser.add_argument("--max-batch", type=int, help="--batch-ramp auto: the largest batch (start x a power of 2)")
    parser.add_argument("--start-batch", type=int, help="--batch-ramp auto: the first batch (default: the loader's)")
    parser.add_argument("--ramp-efficiency", type=float, default=0.8, help="--batch-ramp auto: doubling threshold")
    parser.add_argument("--ramp-patience", type=int, default=20, help="--batch-ramp auto: updates between changes")
    parser.add_argument("--decision-log", help="--batch-ramp auto: append each change to this file as a JSON line")
    parser.add_argument("--target-noise", type=float, default=0.1, help="noise on the regression targets")
    return parser.parse_args(argv)


def synthetic_regression(size: int, seed: int, noise: float = 0.1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(size, 16, generator=generator)
    weights = torch.randn(16, generator=generator)
    targets = features @ weights + noise * torch.randn(size, generator=generator)
    return TensorDataset(features, targets)


def batch_ramp(args: argparse.Namespace) -> str | AutoRamp | None:
    if args.batch_ramp != "auto":
        return args.batch_ramp
    settings = {"efficiency": args.ramp_efficiency, "patience": args.ramp_patience, "start_batch": args.start_batch}
    return AutoRamp(max_batch=args.max_batch, log=args.decision_log, **settings)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # A seeded sampler shuffles by epoch, not by process-local RNG state: a resumed run at another number of processes
    # sees the same order of samples.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    groups = decay_param_groups(model, weight_decay=0.01)
    if args.optimizer == "lamb":
        optimizer = Lamb(groups, lr=args.base_lr, preset="nvidia")
    elif args.optimizer == "lars":
        optimizer = Lars(groups, lr=args.base_lr, momentum=0.9, preset="larc_scale", trust_coefficient=0.02)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.base_lr, momentum=0.9)
    loader = DataLoader(
        synthetic_regression(args.dataset_size, args.seed, args.target_noise),
        batch_size=args.per_device_batch_size,
        shuffle=True,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    config = LegwConfig(
        base_batch_size=args.base_batch_size,
        base_lr=args.base_lr,
        base_warmup_epochs=args.base_warmup_epochs,
        decay=Polynomial(power=2.0),
    )
    scheduler = create_legw_scheduler(
        accelerator, optimizer, config, loader, num_epochs=args.epochs, batch_ramp=batch_ramp(args)
    )
    accelerator.print(scheduler.plan.describe())
    if args.resume_from:
        accelerator.load_state(args.resume_from)  # the scheduler's progress too, converted if the plan changed

    log = open(f"{args.lr_log}.rank{accelerator.process_index}", "w") if args.lr_log else None
    last = scheduler.plan.total_steps if args.stop_after is None else min(args.stop_after, scheduler.plan.total_steps)
    if args.batch_ramp:
        train_ramped(accelerator, model, optimizer, scheduler, loader, last, log)
    else:
        train(accelerator, model, optimizer, scheduler, loader, last, log, args)
    if log:
        log.close()
    if args.output_dir:
        accelerator.save_state(args.output_dir)
    if args.parameters_out:
        state = accelerator.get_state_dict(model)  # whole tensors, also from DeepSpeed's partitions
        if accelerator.is_main_process:
            torch.save(state, args.parameters_out)
    if isinstance(scheduler, AcceleratorAutoRamp):
        accelerator.print(f"decided batch ramp: {scheduler.plan.ramp.to_text()}")
    accelerator.print(f"done: {scheduler.updates} updates, final LR {scheduler.get_last_lr()[0]:.6g}")


def train(accelerator, model, optimizer, scheduler, loader, last, log, args) -> None:
    first_epoch, done_in_epoch = divmod(scheduler.updates, scheduler.plan.steps_per_epoch)
    for epoch in range(first_epoch, int(-(-args.epochs // 1))):
        model.train()
        loader.set_epoch(epoch)
        batches = loader
        if epoch == first_epoch and done_in_epoch:
            batches = accelerator.skip_first_batches(loader, done_in_epoch * args.gradient_accumulation_steps)
        for features, targets in batches:
            if scheduler.updates >= last:
                break
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(features).squeeze(-1), targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients and log:
                    lr_used = optimizer.param_groups[0]["lr"]
                    row = {"update": scheduler.updates, "lr": lr_used, "processes": accelerator.num_processes}
                    log.write(json.dumps(row) + "\n")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()


def train_ramped(accelerator, model, optimizer, scheduler, loader, last, log) -> None:
    """Each update accumulates its stage's micro-batches (the ramp, not accelerate, decides how many)."""
    model.train()
    for update in ramped_updates(accelerator, scheduler, loader, model):
        if update.index >= last:
            break
        samples = 0
        for features, targets in update.micro_batches():
            # loss / accumulation (under DeepSpeed the engine divides by the update's accumulation itself)
            update.backward(torch.nn.functional.mse_loss(model(features).squeeze(-1), targets))
            samples += len(targets)
        if log:
            row = {"update": update.index, "lr": optimizer.param_groups[0]["lr"], "batch": update.batch_size}
            row |= {"samples": samples, "processes": accelerator.num_processes}
            if isinstance(scheduler, AcceleratorAutoRamp):  # the moving averages the ramp decides from
                row |= {"trace": scheduler.noise.trace, "signal": scheduler.noise.signal}
            log.write(json.dumps(row) + "\n")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


if __name__ == "__main__":
    exit_process(main())
