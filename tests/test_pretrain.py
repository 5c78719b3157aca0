"""Pretraining on the shipped real ECG sample: exact resume, DDP on 2 CPU ranks, export, CLI, loss."""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cbramod_fast import CBraMod, ReferenceCBraMod
from cbramod_fast.cli import main
from cbramod_fast.corpus.windows import read_windows
from cbramod_fast.masking import dual_mask, masked_mse
from cbramod_fast.pretrain import (
    DEMO_DATA,
    ArrayLoader,
    PretrainConfig,
    auto_warmup,
    auto_workers,
    export_encoder,
    lr_lambda,
    pretrain,
)
from cbramod_fast.readers import records_in


@pytest.fixture(scope="module")
def windows():
    """48 real windows of the shipped sample: 26 of MIT-BIH 100 (leads II, V5) then 22 of CinC 2021 (12 leads)."""
    w = read_windows(records_in(DEMO_DATA))
    sel = np.r_[0:26, len(w.x) - 22:len(w.x)]
    assert set(w.record[:26]) == {"100"} and "100" not in w.record[-22:]
    return torch.from_numpy(w.x[sel]), torch.from_numpy(w.present[sel])


def _cfg(tmp: Path, **kw) -> PretrainConfig:
    base = PretrainConfig(data="unused", out=str(tmp), preset="tiny", steps=6, batch_size=8, accum=2, lr=1e-3,
                          warmup_steps=2, ckpt_every=3, log_every=1, workers=0, device="cpu", amp="none")
    return replace(base, **kw)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["last_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_resume_is_identical(tmp_path, windows):
    x, present = windows
    straight = tmp_path / "straight"
    pretrain(_cfg(straight), loader=ArrayLoader(x, present, 8, seed=0), quiet=True)
    split = tmp_path / "split"
    pretrain(_cfg(split, stop_at=3), loader=ArrayLoader(x, present, 8, seed=0), quiet=True)
    assert len(_losses(split)) == 3
    # A fresh process state: new loader object, RNGs scrambled, then resume from the checkpoint.
    torch.manual_seed(12345)
    pretrain(_cfg(split), resume=True, loader=ArrayLoader(x, present, 8, seed=0), quiet=True)
    a, b = _losses(straight), _losses(split)
    assert len(a) == len(b) == 6
    assert a == b, f"losses differ after resume: {a} vs {b}"
    wa, wb = _weights(straight), _weights(split)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    ck = torch.load(split / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 6 and {"optimizer", "scheduler", "scaler", "rng", "loader", "config"} <= ck.keys()
    for name in ("loss.png", "reconstruction.png", "config.json"):
        assert (split / name).stat().st_size > 0


class _KilledLoader(ArrayLoader):
    """An ArrayLoader whose process dies when asked for its ``fail_at``-th batch (counted over epochs)."""

    def __init__(self, *args, fail_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at, self.served = fail_at, 0

    def __iter__(self):
        for batch in super().__iter__():
            if self.served == self.fail_at:
                raise KeyboardInterrupt("killed")
            self.served += 1
            yield batch


def test_resume_from_a_checkpoint_taken_with_a_batch_prefetched(tmp_path, windows):
    # The loop fetches the next batch while a step runs, so when a checkpoint is written one batch has been
    # read but not used; the checkpoint must point at that batch, not after it. 8-window batches, 2 per step,
    # 6 per epoch: the step-3 checkpoint holds batch 6 (the first of epoch 1) prefetched; the run dies at batch 8.
    x, present = windows
    straight = tmp_path / "straight"
    pretrain(_cfg(straight), loader=ArrayLoader(x, present, 8, seed=0), quiet=True)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(killed), loader=_KilledLoader(x, present, 8, seed=0, fail_at=8), quiet=True)
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 3
    torch.manual_seed(12345)
    pretrain(_cfg(killed), resume=True, loader=ArrayLoader(x, present, 8, seed=0), quiet=True)
    assert _losses(straight) == _losses(killed)
    wa, wb = _weights(straight), _weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _eval_loss(model, x, present) -> float:
    """Masked MSE of all windows under one fixed dual mask, eval mode."""
    mask = dual_mask(len(x), 12, 10, 0.5, 0.25, generator=torch.Generator().manual_seed(0), present=present)
    model.eval()
    with torch.no_grad():
        return masked_mse(model(x, mask), x, mask, present).item()


def test_learns_to_reconstruct_real_ecg(tmp_path, windows):
    x, present = windows
    run = tmp_path / "run"
    torch.manual_seed(0)
    init = _eval_loss(CBraMod.from_config("tiny"), x, present)
    mask = dual_mask(len(x), 12, 10, 0.5, 0.25, generator=torch.Generator().manual_seed(0), present=present)
    zero = masked_mse(torch.zeros_like(x), x, mask, present).item()  # predicting the baseline (0)
    summary = pretrain(_cfg(run, steps=80, accum=1, batch_size=16, lr=1e-2, warmup_steps=5, ckpt_every=80),
                       loader=ArrayLoader(x, present, 16, seed=1), quiet=True)
    trained = _eval_loss(summary["model"], x, present)
    # Measured (tiny preset, this seed, the original's initialisation, whose large kaiming-normal weights start
    # far off: init 15.0): zero 5.74, trained 4.54 after 80 steps at lr 1e-2 (40 steps at lr 3e-3, enough for
    # PyTorch's default init, end at 5.76); 0.92 leaves room for BLAS noise.
    assert trained < 0.92 * zero and trained < init, f"init {init:.3f} zero {zero:.3f} trained {trained:.3f}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples_per_s"] > 0 and math.isfinite(r["grad_norm"]) and 0 <= r["data_wait"] < 1
               for r in rows)
    assert 0 <= summary["data_wait"] < 1 and summary["data_bound"] == (summary["data_wait"] >= 0.1)


def test_masked_mse_excludes_unmasked_and_absent():
    x = torch.randn(2, 3, 4, 200)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = mask[1, 2, 3] = True
    present = torch.tensor([[True, True, False], [True, True, True]])
    pred = x + 5.0 * (~mask)[..., None]  # wrong everywhere except on the masked patches
    assert masked_mse(pred, x, mask, present).item() == 0.0
    pred = x.clone()
    pred[1, 2, 3] += 2.0
    assert masked_mse(pred, x, mask, present).item() == pytest.approx(2.0)  # (0 + 4) / 2 masked patches
    pred = x.clone()
    pred[0, 2] += 3.0  # absent lead: never a target, even with loss_on="all"
    assert masked_mse(pred, x, mask, present, "all").item() == 0.0


def test_lr_schedule():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(100) == pytest.approx(1e-2)  # min_lr / lr at the end
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_default_warmup_and_workers_fit_the_run_and_the_machine(monkeypatch):
    assert [auto_warmup(s) for s in (3, 60, 500, 40_000, 100_000)] == [0, 3, 25, 2000, 2000]
    # A 60-step run reaches its peak learning rate after 3 steps (a fixed 2,000-step warm-up never would).
    f = lr_lambda(PretrainConfig(steps=60, lr=5e-4))
    assert f(2) == pytest.approx(1.0) and f(0) == pytest.approx(1 / 3)
    cfg = PretrainConfig(steps=60).resolved()
    assert cfg.warmup_steps == 3 and cfg.workers == auto_workers()
    cores = len(os.sched_getaffinity(0))
    assert 0 <= auto_workers() <= max(0, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # one rank per core: no core left for workers
    assert auto_workers() == 0
    # explicit values stay as given
    assert PretrainConfig(steps=60, warmup_steps=7, workers=0).resolved() == replace(cfg, warmup_steps=7, workers=0)


def test_export_loads_into_reference_strict(tmp_path, windows):
    x, present = windows
    run = tmp_path / "run"
    pretrain(_cfg(run, steps=2, accum=1), loader=ArrayLoader(x, present, 8), quiet=True)
    out = export_encoder(run, tmp_path / "encoder.pth")
    sd = torch.load(out, weights_only=True)
    ref = ReferenceCBraMod(dim_feedforward=200, n_layer=2)  # the tiny preset
    ref.load_state_dict(sd, strict=True)
    # the run's checkpoint itself also loads with CBraMod.from_pretrained (it reads the "model" entry)
    loaded = CBraMod.from_pretrained(run / "checkpoint.pt")
    assert loaded.load_report.ok and all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    # and a new run can start from it (CBraMod.from_pretrained): with lr ~ 0 the weights stay put
    run2 = tmp_path / "run2"
    pretrain(_cfg(run2, steps=1, accum=1, lr=1e-12, min_lr=0.0, init=str(out)), loader=ArrayLoader(x, present, 8),
             quiet=True)
    w2 = _weights(run2)
    for k, v in sd.items():
        torch.testing.assert_close(w2[k], v, rtol=0, atol=1e-6, msg=f"{k} not initialised from the export")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's main command, shortened: no --data, so it builds a corpus of the shipped sample."""
    run = tmp_path_factory.mktemp("demo") / "run"
    rc = main(["pretrain", "--out", str(run), "--preset", "tiny", "--steps", "3", "--batch-size", "4",
               "--log-every", "1"])
    assert rc == 0
    return run


def test_cli_demo_and_export(demo_run, tmp_path, capsys):
    run = demo_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "tiny" and cfg["steps"] == 3 and cfg["data"] is None
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run / "loss.png").is_file() and (run / "reconstruction.png").is_file()
    assert main(["export", str(run), "--out", str(tmp_path / "enc.pth")]) == 0
    ReferenceCBraMod(dim_feedforward=200, n_layer=2).load_state_dict(torch.load(tmp_path / "enc.pth"), strict=True)
    # a finished run is not silently overwritten; resuming it with more steps continues it
    assert main(["pretrain", "--out", str(run), "--preset", "tiny", "--steps", "3"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(run), "--resume", "--steps", "4"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_cli_weight_init_is_a_recorded_option(demo_run, tmp_path, capsys):
    common = ["--data", str(demo_run / "corpus"), "--preset", "tiny", "--steps", "1", "--batch-size", "4",
              "--lr", "1e-12", "--min-lr", "0", "--workers", "0"]
    layers, scale = {}, {}
    for init in ("original", "pytorch"):
        run = tmp_path / init
        argv = ["pretrain", *common, "--out", str(run)] + ([] if init == "original" else ["--weight-init", init])
        assert main(argv) == 0
        assert json.loads((run / "config.json").read_text())["weight_init"] == init
        w = _weights(run)
        a, b = w["encoder.layers.0.self_attn_s.in_proj_weight"], w["encoder.layers.1.self_attn_s.in_proj_weight"]
        layers[init] = torch.allclose(a, b, rtol=0, atol=1e-9)
        scale[init] = w["encoder.layers.0.linear1.weight"].std().item()
    # The original's layers start as copies of one (its attention projections stay so: only nn.Linear weights
    # are drawn again, kaiming-normal, larger than PyTorch's); PyTorch's layers are independent. One step at
    # lr 1e-12 changes neither.
    assert layers == {"original": True, "pytorch": False}
    assert scale["original"] > 2 * scale["pytorch"]
    assert main(["pretrain", *common, "--out", str(tmp_path / "bad"), "--weight-init", "xavier"]) == 2
    assert "--weight-init must be one of original, pytorch" in capsys.readouterr().err


@pytest.mark.slow
def test_a_default_short_run_on_real_ecg_learns(demo_run, tmp_path, capsys):
    """A user's first run: 60 steps, batch 16, every other setting the default (base preset, learning rate,
    warm-up, workers), on the corpus built from the shipped real ECG."""
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(demo_run / "corpus"), "--out", str(run), "--steps", "60",
                 "--batch-size", "16"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "base" and cfg["warmup_steps"] == 3 and cfg["workers"] == auto_workers()
    assert cfg["weight_init"] == "original"
    out = capsys.readouterr().out
    assert "warmup_steps = 3" in out and "data-bound" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]  # each row: the mean loss of its 10 steps
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last <= 0.9 * first, f"masked-patch loss {first:.3f} (steps 1-10) -> {last:.3f} (steps 51-60)"
    assert all(0 <= r["data_wait"] < 1 for r in rows)


@pytest.mark.gpu
def test_cuda_run_reads_float16_pinned_batches(demo_run, tmp_path):
    from cbramod_fast.pretrain import make_loader

    cfg = _cfg(tmp_path / "run", data=str(demo_run / "corpus"), device="cuda", amp="bf16", workers=1, steps=4,
               accum=1, ckpt_every=4)
    loader = make_loader(cfg, tmp_path / "run", 0, 1, torch.device("cuda"))
    batch = next(iter(loader))
    assert batch["x"].dtype == torch.float16 and batch["x"].is_pinned()
    summary = pretrain(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and 0 <= r["data_wait"] < 1 for r in rows)
    assert math.isfinite(summary["data_wait"])


def test_cli_resume_identical_over_corpus(demo_run, tmp_path):
    """End to end through the CLI and the memory-mapped CorpusLoader: 6 steps = 3 + resume + 3."""
    corpus = demo_run / "corpus"
    assert (corpus / "manifest.json").is_file(), "the demo did not build a corpus"
    common = ["--data", str(corpus), "--preset", "tiny", "--steps", "6", "--batch-size", "8", "--accum", "2",
              "--log-every", "1", "--ckpt-every", "3", "--warmup", "2", "--workers", "0", "--device", "cpu"]
    assert main(["pretrain", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["pretrain", *common, "--out", str(tmp_path / "b"), "--stop-at", "3"]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("argv,needle", [
    (["--data", "/nonexistent/corpus"], "no such corpus"),
    (["--resume", "--out", "/nonexistent/run"], "does not exist"),
    (["--patch-ratio", "1.5"], "--patch-ratio"),
    (["--preset", "huge"], "unknown --preset"),
])
def test_cli_bad_input(tmp_path, capsys, argv, needle):
    argv = argv if "--out" in argv else argv + ["--out", str(tmp_path / "r")]
    assert main(["pretrain", *argv, "--steps", "1"]) == 2
    assert needle in capsys.readouterr().err


def test_export_bad_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "e.pth")]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


# -- DDP: 2 CPU ranks with gloo --------------------------------------------------------------------------
class _RecordingLoader(ArrayLoader):
    def __iter__(self):
        for batch in super().__iter__():
            self.seen.append(batch["index"].tolist())
            yield batch


def _ddp_worker(rank: int, world: int, port: int, tmp: str, x, present) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    loader = _RecordingLoader(x, present, 4, seed=0, rank=rank, world_size=world)
    loader.seen = []
    summary = pretrain(_cfg(Path(tmp) / "run", steps=2, accum=2, batch_size=4, ckpt_every=2), loader=loader,
                       quiet=True)
    torch.save({"model": summary["model"].state_dict(), "seen": loader.seen}, Path(tmp) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks(tmp_path, windows):
    x, present = windows
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), x[:24], present[:24]),
                                nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"{k} differs between ranks"
    assert len(r0["seen"]) == len(r1["seen"]) == 4  # 2 steps x 2 accumulation micro-batches
    for step, (a, b) in enumerate(zip(r0["seen"], r1["seen"])):
        assert not set(a) & set(b), f"step {step}: ranks share windows {set(a) & set(b)}"
    # 24 windows / 2 ranks / batch 4 = 3 batches per epoch: the first epoch covers every window once.
    first_epoch = [i for batch in r0["seen"][:3] + r1["seen"][:3] for i in batch]
    assert sorted(first_epoch) == list(range(24))
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and len(ck["loader"]) == 2
    for k in r0["model"]:
        assert torch.equal(ck["model"][k], r0["model"][k])
