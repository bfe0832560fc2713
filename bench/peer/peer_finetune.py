"""What the backbone itself allows: every weight fine-tuned, PyTorch, on the prompt's data and batches.

    .venv/bin/python bench/peer/peer_inputs.py --bundle exports/mr-soft --epochs 3
    bench/.peer-venv/bin/python bench/peer/peer_finetune.py --data bench/results/peer-inputs [--lr 3e-5]
        [--epochs 3] [--smoke: 4 steps, the test's]

A ceiling for prompt methods on the same frozen backbone (issue 11 asks a
22M-parameter encoder to pass 83.5% on MR test): transformers' AutoModel in
train mode (its own dropout, 0.1 for BERT), mean pooling over the text, a
linear head, AdamW (weight decay 0.01 except biases and LayerNorm) at one
learning rate with the recipe's warmup and linear decay, our batches of each
epoch in our order (data.json, as bench/peer/peer_inputs.py writes it with
--epochs N). Dev after each epoch; the best epoch's weights score test once.
Writes <results>/finetune_peer.json.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import AutoModel

import peer_torch  # first: it puts bench/ on sys.path, for common
from common import write_results
from peer_torch import accuracy, mean_pool, train_labels


class FineTuned(torch.nn.Module):
    """The whole encoder trained, mean pooling, a linear head: peer_torch.PeerModel without the prompt."""

    def __init__(self, backbone: str, num_labels: int):
        super().__init__()
        self.encoder = AutoModel.from_pretrained(backbone, add_pooling_layer=False)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_labels)

    def forward(self, ids, mask):
        return self.head(mean_pool(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask))


def main():
    p = peer_torch.arguments(__doc__.split("\n")[0])
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate of every weight")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    data, tokenizer = peer_torch.setup(args)
    if args.epochs > len(data["train_batches"]):
        raise SystemExit(f"--epochs {args.epochs}: data.json has batches for {len(data['train_batches'])} epochs"
                         f" (peer_inputs.py --epochs)")
    encodings, y = train_labels(data, tokenizer)
    model = FineTuned(data["backbone"], len(data["labels"]))
    start = copy.deepcopy(model.state_dict())
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, eps=1e-6)
    batches = [b for epoch in data["train_batches"][: args.epochs] for b in epoch]
    if args.smoke:
        batches = batches[:4]
    # the recipe's shape of schedule (warmup 10%, then linear decay to 0) at this peak
    shape = data["lr_schedules"][str(args.epochs)]["head"]
    schedule = [lr / max(shape) * args.lr for lr in shape]
    per_epoch = len(data["train_batches"][0])
    curve, best, started = [], None, time.perf_counter()
    model.train()
    for step, index in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = schedule[step]
        ids, mask = peer_torch.pad([encodings[i] for i in index], data["pad_id"], 1)
        loss = torch.nn.functional.cross_entropy(model(ids, mask), torch.from_numpy(y[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % per_epoch == 0 or step + 1 == len(batches):
            dev = accuracy(model, tokenizer, data["dev"], data)
            curve.append({"epoch": (step + 1) / per_epoch, "dev_accuracy": dev,
                          "seconds": round(time.perf_counter() - started, 1)})
            print(f"fine-tuned epoch {curve[-1]['epoch']:.2f}: dev {dev:.4f} ({curve[-1]['seconds']:.0f} s)",
                  flush=True)
            if best is None or dev > best[0]:
                best = (dev, copy.deepcopy(model.state_dict()))
            model.train()
    model.load_state_dict(best[1])
    result = {"lr": args.lr, "epochs": args.epochs, "batch_size": len(batches[0]), "curve": curve,
              "dev_accuracy": best[0], "test_accuracy": accuracy(model, tokenizer, data["test"], data),
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              # tensors the training changed: every one, or it was not a fine-tuning
              "changed_tensors": sum(not torch.equal(v, start[k]) for k, v in model.state_dict().items()
                                     if v.is_floating_point()),
              "tensors": sum(v.is_floating_point() for v in model.state_dict().values()), **peer_torch.environment()}
    print(f"fine-tuned: best dev {result['dev_accuracy']:.4f}, test {result['test_accuracy']:.4f}")
    write_results(args.results, "finetune_peer", result)


if __name__ == "__main__":
    main()
