"""The demo (`python train_alignkd.py` with no arguments): distill a trained teacher in the shapes world.

1. The world (data/world.py): a tokenizer, 2,000 training images with three questions each, 300 held-out questions
   on unseen scenes.
2. The teacher, made once and kept under OUTPUT_DIR/demo_assets/teacher: its CLIP is first trained to name the
   shape and colour in each cell of the 3 x 3 grid (so vision features carry colour, shape and position; the
   MobileVLM models' CLIP was trained elsewhere too), then frozen; the teacher's LDPv2 projector and LLaMA are trained
   on the questions with CE by this project's own trainer (--no-distill).
3. A smaller student with the teacher's frozen CLIP (as MobileVLM V2-1.7B and -7B share one CLIP) and a fresh
   projector and LLaMA, trained twice from the same initialization, data order and budget: Align-KD from the teacher,
   and CE only (--no-distill). Held-out accuracy and answer CE before and after are printed side by side.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import load_tokenizer
from data.images import process_image
from data.world import COLOURS, SHAPES, _scene, draw, make_world, make_world_tokenizer
from evaluation.heldout import HeldOut
from model import MobileVLM

log = logging.getLogger("alignkd")

TEACHER = dict(hidden_size=128, num_heads=4, num_layers=4)
STUDENT = dict(hidden_size=64, num_heads=2, num_layers=2)
VISION = dict(vision_hidden=64, vision_layers=2)
WORLD = (2000, 300)  # training images, held-out questions
# (steps, batch, lr) of each stage
VISION_STAGE = (300, 32, 3e-3)
TEACHER_STAGE = (1500, 16, 2e-3)
STUDENT_STAGE = (150, 8, 3e-3)
DEMO_DISTILL_FLAGS: list[str] = []  # the trainer's defaults (logit KD + attention KL at weight 0.1)


def cell_labels(scene: list[dict]) -> list[int]:
    """Per grid cell: 0 for empty, else 1 + colour * 3 + shape."""
    labels = [0] * 9
    for o in scene:
        labels[o["cell"]] = 1 + list(COLOURS).index(o["colour"]) * len(SHAPES) + SHAPES.index(o["shape"])
    return labels


def train_vision_tower(model: MobileVLM, steps: int, batch: int, lr: float, seed: int = 0) -> float:
    """Train the CLIP so that every one of the 144 image tokens' worth of patches (2 x 2, as LDPv2 pools them) tells
    the shape and colour in its grid cell and which cell that is (two linear heads), on fresh scenes; returns the
    last batch's accuracy of both. The CLIP is frozen again afterwards."""
    tower = model.vision_tower
    tower.set_trainable(True)
    tower.train()
    with torch.no_grad():  # at the tiny init's scale (0.02) position is drowned by content and learned very slowly
        tower.vision_tower.embeddings.position_embedding.weight.normal_(std=1.0)
    head = torch.nn.Linear(tower.hidden_size, 1 + len(COLOURS) * len(SHAPES))
    where = torch.nn.Linear(tower.hidden_size, 9)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters(), *where.parameters()], lr=lr)
    rng = random.Random(seed)
    token_cell = (torch.arange(12)[:, None] // 4 * 3 + torch.arange(12)[None, :] // 4).flatten()  # [144]
    acc = 0.0
    for _ in range(steps):
        scenes = [_scene(rng) for _ in range(batch)]
        images = torch.stack([process_image(draw(s), "pad") for s in scenes])
        labels = torch.tensor([cell_labels(s) for s in scenes])[:, token_cell]  # [B, 144]
        f = tower(images)  # [B, 576, C]: a 24 x 24 patch grid
        b, _, c = f.shape
        tokens = f.view(b, 12, 2, 12, 2, c).mean((2, 4)).reshape(b, 144, c)
        logits, cell_ids = head(tokens), where(tokens)
        cell_target = token_cell.repeat(b)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + F.cross_entropy(cell_ids.flatten(0, 1),
                                                                                           cell_target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        acc = float(((logits.argmax(-1) == labels).flatten() & (cell_ids.argmax(-1).flatten() == cell_target))
                    .float().mean())
    tower.set_trainable(False)
    return acc


def prepare_assets(root: Path) -> dict[str, Path]:
    """The world and the trained teacher under `root`, made on first use and reused afterwards."""
    root = Path(root)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.model").exists():
        make_world_tokenizer(tok_dir)
    world = root / "world"
    if not (world / "heldout_v1.json").exists():
        log.info(f"making the shapes world ({WORLD[0]} training images, {WORLD[1]} held-out questions)")
        make_world(world, n_train=WORLD[0], n_heldout=WORLD[1], seed=0)
    teacher_dir = root / "teacher"
    if not (teacher_dir / "config.json").exists():
        train_teacher(root, tok_dir, world, teacher_dir)
    return {"tokenizer": tok_dir, "world": world, "train": world / "train_v1.json",
            "heldout": world / "heldout_v1.json", "teacher": teacher_dir}


def train_teacher(root: Path, tok_dir: Path, world: Path, teacher_dir: Path) -> None:
    from train_alignkd import main

    t0 = time.time()
    vocab = load_tokenizer(tok_dir).vocab_size
    init = MobileVLM.tiny(seed=1, vocab_size=vocab, **TEACHER, **VISION)
    steps, batch, lr = VISION_STAGE
    log.info(f"teacher, stage 1: training its CLIP to name each grid cell's shape and colour ({steps} steps)")
    acc = train_vision_tower(init, steps, batch, lr)
    log.info(f"teacher, stage 1: token accuracy (object and cell) {acc:.3f} on the last batch ({time.time() - t0:.0f} s)")
    init.save_pretrained(root / "teacher_init", tokenizer_dir=tok_dir)
    steps, batch, lr = TEACHER_STAGE
    log.info(f"teacher, stage 2: projector + LLaMA on the questions, CE only ({steps} steps of {batch})")
    run = main(["--data", str(world / "train_v1.json"), "--image-folder", str(world),
                "--student", str(root / "teacher_init"), "--no-distill", "--output-dir", str(root / "teacher_run"),
                "--max-steps", str(steps), "--batch-size", str(batch), "--lr", str(lr), "--max-len", "512",
                "--save-every", str(steps), "--keep", "1", "--no-checkpointing", "--seed", "1",
                "--eval-data", str(world / "heldout_v1.json"), "--eval-every", "250", "--num-workers", "1",
                "--overwrite"])
    ckpt = Path(run["checkpoint"])
    (root / "teacher_run" / "heldout.json").write_text(json.dumps(run["evals"][-1]))
    ckpt.rename(teacher_dir)
    log.info(f"teacher ready in {time.time() - t0:.0f} s: held-out exact match {run['evals'][-1]['eval_acc']:.3f}")


def make_student(path: Path, tok_dir: Path, teacher_dir: Path, seed: int) -> Path:
    """A fresh student (STUDENT sizes, seeded) carrying the teacher's frozen CLIP; written once per seed."""
    if not (path / "config.json").exists():
        student = MobileVLM.tiny(seed=seed, vocab_size=load_tokenizer(tok_dir).vocab_size, **STUDENT, **VISION)
        teacher = MobileVLM.from_pretrained(teacher_dir)
        student.vision_tower.load_state_dict(teacher.vision_tower.state_dict())
        student.save_pretrained(path, tokenizer_dir=tok_dir)
    return path


def student_argv(assets: dict[str, Path], student: Path, out: Path, seed: int, steps: int, batch: int, lr: float,
                 eval_every: int = 0, eval_limit: int | None = None) -> list[str]:
    """Arguments of one student run in the world (add --no-distill, --w-* ... for the arm)."""
    argv = ["--data", str(assets["train"]), "--image-folder", str(assets["world"]), "--student", str(student),
            "--teacher", str(assets["teacher"]), "--output-dir", str(out), "--max-steps", str(steps),
            "--batch-size", str(batch), "--lr", str(lr), "--max-len", "512", "--seed", str(seed),
            "--save-every", str(steps), "--keep", "1", "--no-checkpointing", "--num-workers", "1",
            "--eval-data", str(assets["heldout"]), "--eval-every", str(eval_every)]
    return argv + (["--eval-limit", str(eval_limit)] if eval_limit else [])


def run_demo(output_dir: str = "runs/alignkd", steps: int | None = None) -> dict:
    """The whole demo; returns the runs' results. The distilled run is OUTPUT_DIR/distill, the baseline
    OUTPUT_DIR/ce_only."""
    from train_alignkd import main

    out = Path(output_dir)
    t0 = time.time()
    assets = prepare_assets(out / "demo_assets")
    teacher_eval = json.loads((out / "demo_assets" / "teacher_run" / "heldout.json").read_text())
    student = make_student(out / "demo_assets" / "student_init", assets["tokenizer"], assets["teacher"], seed=2)
    n, batch, lr = STUDENT_STAGE
    n = steps or n
    for run in ("distill", "ce_only"):  # the demo's runs start afresh each time
        shutil.rmtree(out / run, ignore_errors=True)
    t1 = time.time()
    distilled = main(student_argv(assets, student, out / "distill", 0, n, batch, lr) + DEMO_DISTILL_FLAGS)
    t2 = time.time()
    baseline = main(student_argv(assets, student, out / "ce_only", 0, n, batch, lr) + ["--no-distill"])
    t3 = time.time()
    before, after, ce_only = distilled["evals"][0], distilled["evals"][-1], baseline["evals"][-1]
    rows = [("teacher", teacher_eval), ("student before training", before),
            (f"student, CE only, {n} steps", ce_only), (f"student, Align-KD, {n} steps", after)]
    print(f"\nheld-out questions on unseen scenes ({after['eval_n']}): exact match and answer CE (nats/token)")
    for name, r in rows:
        print(f"  {name:<32} {r['eval_acc']:6.3f}   {r['eval_ce']:7.4f}")
    print(f"distilled student: {distilled['checkpoint']}; times: assets {t1 - t0:.0f} s, Align-KD {t2 - t1:.0f} s, "
          f"CE only {t3 - t2:.0f} s")
    return {"distill": distilled, "ce_only": baseline, "teacher": teacher_eval}
