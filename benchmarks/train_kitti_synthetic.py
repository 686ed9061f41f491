"""Train a zoo config on the synthetic KITTI-format set with mmdet3d's own runner, then save fp16 weights.

The data comes from benchmarks/synthetic_kitti.py (KITTI's layout and create_data's info files), the recipe is the
config's own (its training pipeline with ObjectSample from the ground-truth database, flips, global rotation and
scaling, its AdamW and gradient clipping), with a shorter schedule: linear warm-up, then cosine decay, over
--epochs. Validation is left to benchmarks/eval_kitti_synthetic.py (mmdet3d's KittiMetric on the held-out split).

    python3 benchmarks/train_kitti_synthetic.py --data data/kitti_synthetic --epochs 24 \
        --out benchmarks/weights/pointpillars_kitti_synthetic.pth

The saved file holds the model's state dict in fp16 (half the size; loading casts back to fp32) and a `meta` with
the recipe, so `autoexport --checkpoint` and the benchmarks read it without trusting the file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def training_config(config: str, data: Path, epochs: int, batch: int, lr: float, workers: int, work_dir: Path):
    from mmengine.config import Config

    from autoexport.configs import resolve_config

    cfg = Config.fromfile(resolve_config(config))
    root = f"{data.resolve()}/"
    dataset = cfg.train_dataloader.dataset
    dataset = dataset.dataset if dataset.type == "RepeatDataset" else dataset
    dataset.data_root = root
    for step in dataset.pipeline:
        if step.type == "ObjectSample":
            step.db_sampler.data_root = root
            step.db_sampler.info_path = f"{root}kitti_dbinfos_train.pkl"
    cfg.train_dataloader.dataset = dataset  # the epoch count below replaces RepeatDataset's doubling
    cfg.train_dataloader.batch_size = batch
    cfg.train_dataloader.num_workers = workers
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs, val_interval=epochs + 1)
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=300),
        dict(type="CosineAnnealingLR", T_max=epochs, eta_min=lr * 1e-3, by_epoch=True, begin=0, end=epochs,
             convert_to_iter_based=True)]
    for section in ("val_dataloader", "val_evaluator", "val_cfg", "test_dataloader", "test_evaluator", "test_cfg"):
        cfg[section] = None
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, max_keep_ckpts=1)  # a cut-short run keeps its last epoch
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=50)
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=0)
    cfg.resume = True  # continues from WORK_DIR's last epoch checkpoint when a run was cut short
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class")
    parser.add_argument("--data", type=Path, required=True, help="folder written by benchmarks/synthetic_kitti.py")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/train_kitti_synthetic"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from mmdet3d.utils import register_all_modules
    from mmengine.runner import Runner

    register_all_modules()
    from autoexport.checkpoint import checkpoint_safe_globals

    # Resuming reads the runner's own checkpoint with torch.load's weights-only default: allow what it holds.
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    cfg = training_config(args.config, args.data, args.epochs, args.batch, args.lr, args.workers, args.work_dir)
    runner = Runner.from_cfg(cfg)
    start = time.perf_counter()
    runner.train()
    minutes = (time.perf_counter() - start) / 60
    state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in runner.model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state,
                "meta": {"config": args.config, "trained_on": "benchmarks/synthetic_kitti.py (synthetic KITTI layout)",
                         "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                         "train_minutes": round(minutes, 1),
                         "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}},
               args.out)
    print(f"[train] saved {args.out} after {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
