"""Probe: how many tokens would a trained draft head get accepted for this target? (GPU, minutes.)

    python3 scripts/draft_head_probe.py --model PATH.gguf --device cuda --data question.jsonl --out DIR

A question before building a trained drafter: the training-free drafters reach MAT 1.4-1.8 with the 2-8 node trees
that pay on a CPU, and the server's 1.5x goal at concurrency 1 needs about 1.9 (BENCHMARKS.md section 0c). This
script trains an EAGLE-style draft head (one decoder layer over the target's last hidden state and the next token's
embedding, predicting the next hidden state; the target's own LM head turns it into tokens) and measures, on
Spec-Bench questions it never trained on, how long a greedy chain it drafts would be accepted.

1. Training text: the target answers distill.corpus_prompts (the prompts `leapdecode distill-tables` uses; passages,
   then tasks on them), greedy and sampled (--samples rounds at temperature 0.7), --new-tokens each.
2. Features: the target's final hidden states (after the last norm: what its LM head reads) for every position.
3. Training: row i reads (feature_i, embedding of token i+1) and is trained to give feature_{i+1} (smooth L1) whose
   logits give token i+2 (cross-entropy against the text, which is the target's own output).
4. Evaluation: the first turn of --per-category questions per category, answered greedily by the target
   (--new-tokens). At every answer position the head drafts a chain of --depth tokens from the true context, feeding
   its own features and tokens forward as it would when decoding; a chain's accepted length is the number of its
   leading tokens equal to the target's. Printed: acceptance at each depth, and the mean tokens per step (MAT) of
   chains of length 1..depth. Also with the head's argmax restricted to the --vocab most frequent tokens of the
   training text (a smaller head is what a CPU could afford per drafted token); and on every 20th greedy answer of
   the training prompts, held out of training (in distribution: separates what the head can learn from how far it
   carries to other questions).

Writes DIR/probe.json (the figures) and DIR/head.pt (the head's weights, float16).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leapdecode.distill import corpus_prompts, generate_corpus, with_passages
from leapdecode.models.load import load_model
from measure_drafters import questions as spec_bench_questions  # scripts/ is on sys.path when this script runs


class DraftHead(nn.Module):
    """fc([feature, embedding]) -> one pre-norm decoder layer (GQA attention with RoPE, SwiGLU MLP) -> feature."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, inter: int, eps: float, theta: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, hidden // heads, eps
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.attn_norm, self.mlp_norm = nn.Parameter(torch.ones(hidden)), nn.Parameter(torch.ones(hidden))
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.register_buffer("inv_freq", theta ** (-torch.arange(0, self.head_dim, 2).float() / self.head_dim))

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[..., None].float() * self.inv_freq  # [B, T, d/2]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [B, 1, T, d/2]
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)

    def forward(self, feature: torch.Tensor, embedding: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """feature, embedding [B, T, hidden]; positions [B, T]; mask [B, 1, T, T] bool (True: may attend)."""
        b, t, _ = feature.shape
        x = self.fc(torch.cat([feature, embedding], dim=-1))  # [B, T, hidden]
        h = F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps)
        q, k, v = self.qkv(h).view(b, t, -1, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1)  # [B, heads or kv_heads, T, d]
        q, k = self.rope(q, positions), self.rope(k, positions)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, heads, T, d]
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(F.rms_norm(x, (x.shape[-1],), self.mlp_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def autocast(device) -> torch.autocast:
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


@torch.no_grad()
def features(model, seqs: list[list[int]], batch: int = 64) -> list[torch.Tensor]:
    """The target's final hidden states [L, hidden] of each token sequence (right padded in batches)."""
    out = []
    for start in range(0, len(seqs), batch):
        chunk = seqs[start:start + batch]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        hidden = model.hf_model.model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
        hidden = hidden.last_hidden_state  # [B, W, hidden], after the final norm
        out += [hidden[i, :len(s)].to(torch.bfloat16) for i, s in enumerate(chunk)]
    return out


def batches(seqs, feats, size, generator):
    order = torch.randperm(len(seqs), generator=generator).tolist()
    for start in range(0, len(order), size):
        yield [seqs[i] for i in order[start:start + size]], [feats[i] for i in order[start:start + size]]


def train(head, model, seqs, feats, epochs: int, lr: float, batch: int, device) -> list[float]:
    embed, lm_head = model.hf_model.get_input_embeddings(), model.hf_model.get_output_embeddings()
    steps = epochs * math.ceil(len(seqs) / batch)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(
        math.pi * min(s, steps) / steps)))
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(epochs):
        for chunk, fchunk in batches(seqs, feats, batch, gen):
            width = max(len(s) for s in chunk) - 2  # rows i = 0 .. L-3 have targets i+1 (feature), i+2 (token)
            tok = torch.zeros(len(chunk), width + 2, dtype=torch.long, device=device)
            feat = torch.zeros(len(chunk), width + 2, fchunk[0].shape[-1], dtype=torch.bfloat16, device=device)
            valid = torch.zeros(len(chunk), width, dtype=torch.bool, device=device)
            for i, (s, f) in enumerate(zip(chunk, fchunk)):
                tok[i, :len(s)], feat[i, :len(s)], valid[i, :len(s) - 2] = torch.tensor(s, device=device), f, True
            positions = torch.arange(width, device=device).expand(len(chunk), width)
            mask = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None, None]
            with autocast(device):
                with torch.no_grad():
                    emb = embed(tok[:, 1:width + 1])
                pred = head(feat[:, :width], emb, positions, mask)  # [B, W, hidden]
                logits = lm_head(pred[valid])  # [N, vocab]
                token_loss = F.cross_entropy(logits.float(), tok[:, 2:][valid])
                feature_loss = F.smooth_l1_loss(pred[valid].float(), feat[:, 1:width + 1][valid].float())
                loss = token_loss + 0.1 * feature_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(token_loss))
    return losses


@torch.no_grad()
def accepted_lengths(head, model, seq: list[int], feat: torch.Tensor, first: int, depth: int,
                     allowed: torch.Tensor | None) -> torch.Tensor:
    """For each start i in [first, L - depth - 2]: the root is token i+1; the head drafts tokens i+2 .. i+1+depth
    from the true context (rows 0..i) and its own chain; returns how many leading drafted tokens equal the text."""
    device = feat.device
    embed, lm_head = model.hf_model.get_input_embeddings(), model.hf_model.get_output_embeddings()
    tokens = torch.tensor(seq, device=device)
    n = len(seq) - 2  # rows 0 .. L-3
    row = torch.arange(n, device=device)
    cur_feat, cur_tok = feat[:n], tokens[1:n + 1]  # block 0 inputs: the true context
    blocks_feat, blocks_tok, correct = [], [], []
    for j in range(depth):
        blocks_feat.append(cur_feat)
        blocks_tok.append(cur_tok)
        # rows (b, i) for blocks b <= j: block 0 row i sees block-0 rows <= i; a later block row i sees block-0
        # rows <= i and rows i of blocks 1 .. itself (its own chain)
        m = len(blocks_feat)
        blk = torch.arange(m, device=device).repeat_interleave(n)  # [m*n]
        idx = row.repeat(m)  # [m*n]
        same_chain = (idx[:, None] == idx[None, :]) & (blk[None, :] <= blk[:, None]) & (blk[None, :] >= 1)
        context = (blk[None, :] == 0) & (idx[None, :] <= idx[:, None])
        mask = (same_chain | context)[None, None]
        positions = (idx + blk)[None]
        with autocast(device):
            out = head(torch.cat(blocks_feat)[None], embed(torch.cat(blocks_tok))[None], positions, mask)[0]
            logits = lm_head(out[-n:]).float()  # [n, vocab]: the newest block
        if allowed is not None:
            logits[:, ~allowed] = float("-inf")
        draft = logits.argmax(-1)  # [n]: token i+2+j drafted at start i
        target_idx = (row + 2 + j).clamp(max=len(seq) - 1)
        correct.append(draft == tokens[target_idx])
        cur_feat, cur_tok = out[-n:].to(feat.dtype), draft
    ok = torch.stack(correct, 1)  # [n, depth]
    lengths = ok.int().cumprod(1).sum(1)  # leading run of correct drafts
    starts = torch.arange(first, max(first, n - depth), device=device)
    return lengths[starts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", required=True, help="Spec-Bench question.jsonl (evaluation questions)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=2, help="sampled answer rounds added to the greedy one")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--limit", type=int, default=0, help="prompts per round (0 = all); for a quick check")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    model = load_model(args.model, device=args.device, dtype=torch.float32)
    model.hf_model.requires_grad_(False)
    config = model.hf_model.config
    log = lambda msg: print(f"[{time.time() - began:6.0f} s] {msg}", flush=True)  # noqa: E731

    passage_prompts, prompts = corpus_prompts(0)
    if args.limit:
        passage_prompts, prompts = passage_prompts[:args.limit], prompts[:args.limit]
    passages = generate_corpus(model, passage_prompts, args.new_tokens, 256)
    on_passage = with_passages([model.decode(a) for _, a in passages], 0)[:args.limit or None]
    all_prompts = passage_prompts + prompts + on_passage
    pairs = passages + generate_corpus(model, prompts + on_passage, args.new_tokens, 256)
    for k in range(args.samples):
        pairs += generate_corpus(model, all_prompts, args.new_tokens, 256, 0.7, 1 + k)
    greedy_count = len(pairs) - args.samples * len(all_prompts)
    held_out = set(range(0, greedy_count, 20))  # their prompts' sampled answers stay in training
    held = [pairs[i] for i in sorted(held_out) if len(pairs[i][1]) > args.depth + 2]
    seqs = [p + a for i, (p, a) in enumerate(pairs) if len(a) >= 4 and i not in held_out]
    log(f"training text: {len(seqs)} sequences, {sum(len(s) for s in seqs)} tokens")
    feats = features(model, seqs)
    head = DraftHead(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                     config.intermediate_size, config.rms_norm_eps, rope_theta(config)).to(args.device)
    params = sum(p.numel() for p in head.parameters())
    losses = train(head, model, seqs, feats, args.epochs, args.lr, args.batch, args.device)
    log(f"trained {params / 1e6:.2f} M parameters, {len(losses)} steps; token loss first 20 "
        f"{sum(losses[:20]) / 20:.3f}, last 20 {sum(losses[-20:]) / 20:.3f}")

    counts = Counter(t for s in seqs for t in s)
    allowed = torch.zeros(model.hf_model.get_output_embeddings().weight.shape[0], dtype=torch.bool,
                          device=args.device)
    allowed[[t for t, _ in counts.most_common(args.vocab)]] = True
    asked = spec_bench_questions(Path(args.data), args.per_category, None)
    answered = generate_corpus(model, [q["turns"][0] for q in asked], args.new_tokens, 256)
    eval_seqs = [(p, a) for p, a in answered if len(a) > args.depth + 2]
    eval_feats = features(model, [p + a for p, a in eval_seqs])
    held_feats = features(model, [p + a for p, a in held])
    head.eval()
    results = {}
    for name, mask, pairs_, feats_ in (
            ("Spec-Bench, full vocabulary", None, eval_seqs, eval_feats),
            (f"Spec-Bench, top {args.vocab} tokens", allowed, eval_seqs, eval_feats),
            ("held-out training prompts (every 20th greedy answer), full vocabulary", None, held, held_feats)):
        lengths = torch.cat([accepted_lengths(head, model, p + a, f, len(p) - 1, args.depth, mask)
                             for (p, a), f in zip(pairs_, feats_)]).float()
        depth_rate = [float((lengths >= d).float().mean()) for d in range(1, args.depth + 1)]
        mat = [1.0 + float(lengths.clamp(max=k).mean()) for k in range(1, args.depth + 1)]
        results[name] = {"positions": int(lengths.numel()), "accepted_at_depth": depth_rate,
                         "chain_mat": mat}
        log(f"{name}: {lengths.numel()} positions; P(depth d accepted) "
            + " ".join(f"d{d + 1} {r:.3f}" for d, r in enumerate(depth_rate))
            + "; chain MAT " + " ".join(f"k={k + 1} {m:.2f}" for k, m in enumerate(mat)))
    summary = {"model": args.model, "training_sequences": len(seqs),
               "training_tokens": sum(len(s) for s in seqs), "head_parameters": params,
               "epochs": args.epochs, "lr": args.lr, "loss_first20": sum(losses[:20]) / 20,
               "loss_last20": sum(losses[-20:]) / 20, "eval_questions": len(eval_seqs),
               "new_tokens": args.new_tokens, "results": results, "seconds": time.time() - began}
    (out / "probe.json").write_text(json.dumps(summary, indent=1))
    torch.save({k: v.half() for k, v in head.state_dict().items()}, out / "head.pt")
    print("| vocabulary | " + " | ".join(f"chain {k + 1}" for k in range(args.depth)) + " |")
    for name, r in results.items():
        print(f"| MAT, {name} | " + " | ".join(f"{m:.2f}" for m in r["chain_mat"]) + " |")


if __name__ == "__main__":
    main()
