"""One rank of the two-process Trainer test (tests/admin_torch/test_hf_trainer.py); not a test itself.

Launched twice by the test, each time as two processes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT in the environment, gloo, CPU):

* ``full OUT``: trains a converted tiny ``BertForMaskedLM`` with ``sign_optim.AddSign`` +
  ``CosineInternalDecay`` for ``STEPS`` steps under ``transformers.Trainer`` (DDP), saving a Trainer
  checkpoint every ``SAVE`` steps; rank 0 writes the final parameters, the Admin output on fixed
  inputs and the output of ``admin_torch.fold`` of the trained model.
* ``resume OUT CKPT``: a fresh converted model and optimizer, ``trainer.train(resume_from_checkpoint=CKPT)``
  to the same ``STEPS``; then once more from CKPT with the optimizer's moving averages zeroed after
  Trainer loaded them (a lost moving average), for the test to show that the tolerance detects it.
* ``accelerate OUT`` / ``accelerate_resume OUT CKPT``: the same training as a plain ``accelerate`` loop
  (``Accelerator.prepare``, ``accelerator.backward``), ``accelerator.save_state`` after ``SAVE`` steps;
  the resume is a fresh converted model and optimizer, ``accelerator.load_state(CKPT)`` and the data loader
  past its first ``SAVE`` batches (``skip_first_batches``).
* ``trainer_all OUT`` / ``accelerate_all OUT``: the unbroken run and its resume in one launch (the ranks' start-up,
  torch and transformers imports, paid once): ``full`` (``accelerate``), then rank 0 copies the checkpoint of
  update ``SAVE`` alone to ``OUT/ckpt3`` (``OUT/state3``), where the unbroken run's later checkpoint is not
  around, every rank waits for the copy, and ``resume`` (``accelerate_resume``) starts from that copy.
"""

import json
import os
import shutil
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import admin_torch  # noqa: E402
import sign_optim  # noqa: E402

STEPS, SAVE, BATCH, SEQ, VOCAB = 6, 3, 4, 8, 40
transformers.utils.logging.set_verbosity_error()


def build():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=32)
    return admin_torch.convert(BertForMaskedLM(config), as_parameter=True)


class Data(torch.utils.data.Dataset):
    """Fixed random token sequences, the last two positions of odd items padded; labels = the tokens."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
        self.mask = torch.ones(n, SEQ, dtype=torch.long)
        self.mask[1::2, -2:] = 0
        self.ids[1::2, -2:] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[self.mask[i] == 0] = -100
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


class ZeroMovingAverages(TrainerCallback):
    """After Trainer restored the optimizer (on_train_begin runs after that): every exp_avg set to zero."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        for st in optimizer.state.values():
            st["exp_avg"].zero_()


def train(out, resume=None, lose_avg=False):
    model = build()
    opt = sign_optim.AddSign(model.parameters(), lr=3e-3, beta=0.9,
                             sign_internal_decay=sign_optim.CosineInternalDecay(STEPS))
    args = TrainingArguments(
        output_dir=out, max_steps=STEPS, save_steps=SAVE, save_strategy="steps", per_device_train_batch_size=BATCH,
        use_cpu=True, ddp_backend="gloo", lr_scheduler_type="constant", seed=3, data_seed=3, report_to=[],
        logging_strategy="no", dataloader_num_workers=0, save_only_model=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None),
                      callbacks=[ZeroMovingAverages()] if lose_avg else None)
    trainer.train(resume_from_checkpoint=resume)
    model.trainer_info = {"world_size": trainer.args.world_size,
                          "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)}
    return model, opt


def train_accelerate(out, resume=None):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    accelerator = Accelerator(cpu=True)
    set_seed(3)
    model = build()
    opt = sign_optim.AddSign(model.parameters(), lr=3e-3, beta=0.9,
                             sign_internal_decay=sign_optim.CosineInternalDecay(STEPS))
    loader = torch.utils.data.DataLoader(Data(), batch_size=BATCH, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    start = 0
    if resume is not None:
        accelerator.load_state(resume)
        start = SAVE
        loader = accelerator.skip_first_batches(loader, SAVE)
    model.train()
    for step, batch in enumerate(loader, start):
        if step == STEPS:
            break
        loss = model(**batch).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 == SAVE and resume is None:
            accelerator.save_state(os.path.join(out, "accelerate_state"))
    model = accelerator.unwrap_model(model)
    model.trainer_info = {"world_size": accelerator.num_processes,
                          "ddp": accelerator.distributed_type.value == "MULTI_CPU"}
    return model, opt.optimizer


def record(model, opt, path, with_fold):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    steps = sorted({float(s["step"]) for s in opt.state.values()})
    result = {"params": params, "opt_steps": steps, **model.trainer_info}
    if with_fold:
        data = Data(4)
        model.eval()
        with torch.no_grad():
            admin = model(input_ids=data.ids, attention_mask=data.mask).logits
            folded = admin_torch.fold(model).eval()
            plain = folded(input_ids=data.ids, attention_mask=data.mask).logits
        result.update(fold_err=(admin - plain).abs().max().item(),
                      folded_has_omegas=any(isinstance(m, admin_torch.OmegaResidual) for m in folded.modules()))
    torch.save(result, path)


def copy_on_rank0(src, dst, rank):
    """``src`` copied to ``dst`` by rank 0 while the other ranks wait (the copy is there for all when it returns)."""
    if rank == 0:
        shutil.copytree(src, dst)
    torch.distributed.barrier()


def main():
    mode, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    if mode in ("trainer_all", "accelerate_all"):
        first, resume, src, dst = (("full", "resume", os.path.join(out, "full", f"checkpoint-{SAVE}"), "ckpt3")
                                   if mode == "trainer_all" else
                                   ("accelerate", "accelerate_resume", os.path.join(out, "accelerate_state"), "state3"))
        sys.argv[1:] = [first, out]
        main()
        copy_on_rank0(src, os.path.join(out, dst), rank)
        sys.argv[1:] = [resume, out, os.path.join(out, dst)]
        main()
        return
    if mode == "full":
        model, opt = train(os.path.join(out, "full"))
        if rank == 0:
            record(model, opt, os.path.join(out, "full.pt"), with_fold=True)
    elif mode == "resume":
        ckpt = sys.argv[3]
        model, opt = train(os.path.join(out, "resumed"), resume=ckpt)
        if rank == 0:
            record(model, opt, os.path.join(out, "resumed.pt"), with_fold=True)
        model, opt = train(os.path.join(out, "lost"), resume=ckpt, lose_avg=True)
        if rank == 0:
            record(model, opt, os.path.join(out, "lost.pt"), with_fold=False)
    elif mode == "accelerate":
        model, opt = train_accelerate(out)
        if rank == 0:
            record(model, opt, os.path.join(out, "accelerate.pt"), with_fold=True)
    elif mode == "accelerate_resume":
        model, opt = train_accelerate(out, resume=sys.argv[3])
        if rank == 0:
            record(model, opt, os.path.join(out, "accelerate_resumed.pt"), with_fold=True)
    else:
        raise ValueError("mode must be 'full', 'resume', 'accelerate', 'accelerate_resume', 'trainer_all' or "
                         f"'accelerate_all', got {mode!r}")
    if rank == 0:
        with open(os.path.join(out, f"{mode}.done"), "w") as f:
            json.dump({"ok": True}, f)


if __name__ == "__main__":
    main()
