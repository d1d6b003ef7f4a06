"""The demo (`python train_alignkd.py` with no arguments): distill a trained teacher in the shapes world.

1. The world (data/world.py): a tokenizer, 2,000 training images with sixteen questions each (and a caption), 300
   held-out questions on unseen scenes.
2. The teacher, made once and kept under OUTPUT_DIR/demo_assets/teacher: its CLIP is first trained to name the
   object (shape and colour, or none) in each image token and the token's grid cell (so vision features carry colour,
   shape and position; the MobileVLM models' CLIP was trained elsewhere too), then frozen; the teacher's LDPv2
   projector and LLaMA are trained with CE by this project's own trainer (--no-distill), on the captions and then on
   the questions.
3. A smaller student with the teacher's frozen CLIP (as MobileVLM V2-1.7B and -7B share one CLIP) and a fresh
   projector and LLaMA, pre-trained on the captions (as the MobileVLM student is pre-trained before Align-KD), then
   fine-tuned on the questions twice from that initialization, with one data order and budget: Align-KD from the
   teacher, and CE only (--no-distill). Held-out accuracy and answer CE before and after are printed side by side.
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
from transformers import get_cosine_schedule_with_warmup

from data import load_tokenizer
from data.images import process_image
from data.world import COLOURS, SHAPES, _scene, draw, make_world, make_world_tokenizer, object_tokens
from evaluation.heldout import HeldOut
from model import MobileVLM

log = logging.getLogger("alignkd")

TEACHER = dict(hidden_size=128, num_heads=4, num_layers=4)
STUDENT = dict(hidden_size=64, num_heads=2, num_layers=2)
VISION = dict(vision_hidden=64, vision_layers=2)
WORLD = (2000, 300, 16)  # training images, held-out questions, questions per training image
# (steps, batch, lr) of each stage
VISION_STAGE = (400, 32, 3e-3)
CAPTION_STAGE = (600, 16, 2e-3)
# the questions in two cosine cycles, the second a warm restart at half the rate: held-out accuracy was rising
# fastest (0.60 at step 1,000, 0.76 at 1,500) when the first cycle's rate ran out
TEACHER_STAGES = ((2000, 16, 2e-3), (1500, 16, 1e-3))
STUDENT_CAPTION_STAGE = (300, 16, 3e-3)  # before either arm
STUDENT_STAGE = (150, 8, 3e-3)
DEMO_DISTILL_FLAGS: list[str] = []  # the trainer's defaults (logit KD + attention KL + text-focused projector KD)


# the grid cell (0-8) of each image token, 12 x 12 in raster order: a cell is 4 x 4 tokens
TOKEN_CELL = (torch.arange(12)[:, None] // 4 * 3 + torch.arange(12)[None, :] // 4).flatten()


def token_labels(scene: list[dict]) -> list[int]:
    """Per image token (12 x 12, raster order): 0 where there is no object, else 1 + colour * 3 + shape."""
    labels = [0] * 144
    for o in scene:
        for t in object_tokens(o):
            labels[t] = 1 + list(COLOURS).index(o["colour"]) * len(SHAPES) + SHAPES.index(o["shape"])
    return labels


def _tokens(tower, scenes: list[list[dict]]) -> torch.Tensor:
    """The CLIP's features pooled 2 x 2, as LDPv2 pools them: [B, 144, C], one per image token."""
    f = tower(torch.stack([process_image(draw(s), "pad") for s in scenes]))  # [B, 576, C]: a 24 x 24 patch grid
    b, _, c = f.shape
    return f.view(b, 12, 2, 12, 2, c).mean((2, 4)).reshape(b, 144, c)


def train_vision_tower(model: MobileVLM, steps: int, batch: int, lr: float, seed: int = 0) -> tuple[float, float]:
    """Train the CLIP so that every image token tells the object it holds (shape and colour, or none) and which grid
    cell it lies in (two linear heads), on fresh scenes; returns the heads' accuracies on 64 new scenes: the object,
    on the object tokens, and the cell, on every token. The CLIP is frozen again afterwards."""
    tower = model.vision_tower
    tower.set_trainable(True)
    tower.train()
    with torch.no_grad():  # at the tiny init's scale (0.02) position is drowned by content and learned very slowly
        tower.vision_tower.embeddings.position_embedding.weight.normal_(std=1.0)
    head = torch.nn.Linear(tower.hidden_size, 1 + len(COLOURS) * len(SHAPES))
    where = torch.nn.Linear(tower.hidden_size, 9)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters(), *where.parameters()], lr=lr)
    schedule = get_cosine_schedule_with_warmup(opt, steps // 10, steps)
    rng = random.Random(seed)
    for _ in range(steps):
        scenes = [_scene(rng) for _ in range(batch)]
        labels = torch.tensor([token_labels(s) for s in scenes]).flatten()
        tokens = _tokens(tower, scenes).flatten(0, 1)
        ce = F.cross_entropy(head(tokens), labels, reduction="none")
        has_object = labels > 0  # ~12 tokens in 144: weighed as much as the empty ones, or they are never learned
        loss = ce[has_object].mean() + ce[~has_object].mean() + F.cross_entropy(where(tokens), TOKEN_CELL.repeat(batch))
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
    tower.set_trainable(False)
    fresh = random.Random(seed + 1)
    scenes = [_scene(fresh) for _ in range(64)]
    with torch.no_grad():
        labels = torch.tensor([token_labels(s) for s in scenes]).flatten()
        tokens = _tokens(tower, scenes).flatten(0, 1)
        predicted, cell = head(tokens).argmax(-1), where(tokens).argmax(-1)
    return (float((predicted == labels)[labels > 0].float().mean()),
            float((cell == TOKEN_CELL.repeat(len(scenes))).float().mean()))


def prepare_assets(root: Path) -> dict[str, Path]:
    """The world and the trained teacher under `root`, made on first use and reused afterwards."""
    root = Path(root)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.model").exists():
        make_world_tokenizer(tok_dir)
    world = root / "world"
    if not (world / "heldout_v1.json").exists():
        log.info(f"making the shapes world ({WORLD[0]} training images, {WORLD[1]} held-out questions)")
        make_world(world, n_train=WORLD[0], n_heldout=WORLD[1], seed=0, questions_per_image=WORLD[2])
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
    log.info(f"teacher, stage 1: training its CLIP to name the object in each image token ({steps} steps)")
    acc, cell = train_vision_tower(init, steps, batch, lr)
    log.info(f"teacher, stage 1: on new scenes, object tokens named right: {acc:.3f}; tokens placed in their grid "
             f"cell: {cell:.3f} ({time.time() - t0:.0f} s)")
    init.save_pretrained(root / "teacher_init", tokenizer_dir=tok_dir)
    common = ["--image-folder", str(world), "--no-distill", "--max-len", "512", "--keep", "1", "--no-checkpointing",
              "--seed", "1", "--num-workers", "1", "--overwrite"]
    # Captions first: naming every object in turn is dense grounded supervision (after "red", "circle" is the shape
    # of the red object), from which a model trained from scratch learns to look up image tokens; on the questions
    # alone it stays at the answer priors.
    steps, batch, lr = CAPTION_STAGE
    log.info(f"teacher, stage 2: projector + LLaMA on the captions, CE only ({steps} steps of {batch})")
    run = main(["--data", str(world / "train_plain.json"), "--template", "plain", "--student", str(root / "teacher_init"),
                "--output-dir", str(root / "teacher_captions"), "--max-steps", str(steps), "--batch-size", str(batch),
                "--lr", str(lr), "--save-every", str(steps), "--no-eval-at-start", *common])
    for i, (steps, batch, lr) in enumerate(TEACHER_STAGES):
        log.info(f"teacher, stage {3 + i}: projector + LLaMA on the questions, CE only ({steps} steps of {batch}, "
                 f"lr {lr})")
        out = "teacher_run" if i == len(TEACHER_STAGES) - 1 else f"teacher_questions{i + 1}"
        run = main(["--data", str(world / "train_v1.json"), "--student", run["checkpoint"],
                    "--output-dir", str(root / out), "--max-steps", str(steps), "--batch-size", str(batch),
                    "--lr", str(lr), "--save-every", str(steps), "--eval-data", str(world / "heldout_v1.json"),
                    "--eval-every", "250", *common])
    (root / "teacher_run" / "heldout.json").write_text(json.dumps(run["evals"][-1]))
    # written anew rather than moved: the checkpoint's config names its vision tower folder by absolute path
    MobileVLM.from_pretrained(run["checkpoint"]).save_pretrained(teacher_dir, tokenizer_dir=tok_dir)
    log.info(f"teacher ready in {time.time() - t0:.0f} s: held-out exact match {run['evals'][-1]['eval_acc']:.3f}")


def make_student(path: Path, assets: dict[str, Path], seed: int) -> Path:
    """A student (STUDENT sizes, seeded) carrying the teacher's frozen CLIP, with a fresh projector and LLaMA
    pre-trained on the captions with CE (as MobileVLM V2-1.7B is pre-trained before Align-KD fine-tunes it); written
    once per seed."""
    from train_alignkd import main

    if not (path / "config.json").exists():
        student = MobileVLM.tiny(seed=seed, vocab_size=load_tokenizer(assets["tokenizer"]).vocab_size, **STUDENT,
                                 **VISION)
        teacher = MobileVLM.from_pretrained(assets["teacher"])
        student.vision_tower.load_state_dict(teacher.vision_tower.state_dict())
        fresh = path.with_name(path.name + "_fresh")
        student.save_pretrained(fresh, tokenizer_dir=assets["tokenizer"])
        steps, batch, lr = STUDENT_CAPTION_STAGE
        run = main(["--data", str(assets["world"] / "train_plain.json"), "--image-folder", str(assets["world"]),
                    "--template", "plain", "--student", str(fresh), "--no-distill", "--output-dir",
                    str(path.with_name(path.name + "_captions")), "--max-steps", str(steps), "--batch-size",
                    str(batch), "--lr", str(lr), "--max-len", "512", "--save-every", str(steps), "--keep", "1",
                    "--no-checkpointing", "--seed", str(seed), "--num-workers", "1", "--overwrite"])
        MobileVLM.from_pretrained(run["checkpoint"]).save_pretrained(path, tokenizer_dir=assets["tokenizer"])
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
    student = make_student(out / "demo_assets" / "student_init", assets, seed=2)
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
    rows = [("teacher", teacher_eval), ("student before (captions only)", before),
            (f"student, CE only, {n} steps", ce_only), (f"student, Align-KD, {n} steps", after)]
    print(f"\nheld-out questions on unseen scenes ({after['eval_n']}): exact match, answer CE (nats/token), and "
          "grounding (first-layer attention on the image tokens asked about; 0.03 is not looking)")
    for name, r in rows:
        grounding = r.get("eval_grounding", float("nan"))
        print(f"  {name:<32} {r['eval_acc']:6.3f}   {r['eval_ce']:7.4f}   {grounding:6.3f}")
    print(f"distilled student: {distilled['checkpoint']}; times: assets {t1 - t0:.0f} s, Align-KD {t2 - t1:.0f} s, "
          f"CE only {t3 - t2:.0f} s")
    return {"distill": distilled, "ce_only": baseline, "teacher": teacher_eval}
