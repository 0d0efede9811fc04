"""Does pruning pay? Parameters, MACs, memory, prefill latency and decode speed, dense vs pruned, side by side.

Why a decode path of our own: HF's eager ``generate`` spends most of a small model's decode step in Python
(cache objects, mask construction, logits processors), so removing half the weights barely changes tokens/s.
``FastDecoder`` reads the (possibly pruned, per-layer-shaped) weights of a LLaMA-family model once, fuses
q/k/v and gate/up into one matrix each, keeps a static pre-allocated KV cache, and runs a plain loop of
matmuls — so the time per token follows the bytes of weights read, which is what pruning reduces.
Weights are stored transposed, ``(in, out)``, and applied as ``x @ w``: at batch 1 on the 2-core development
CPU that streams weights 1.25× faster than ``F.linear`` on ``(out, in)`` and the 28M-parameter LM head 1.7×
faster (``benchmarks/README.md``); cuBLAS takes either layout.

Run ``python -m tailored.speed --help`` (or ``tailored bench``) for the benchmark.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from tailored.anatomy import count_parameters, decoder_layers
from tailored.artifacts import write_json
from tailored.models import load


def _transposed(w: torch.Tensor) -> torch.Tensor:
    """A weight ``(out, in)`` as a contiguous ``(in, out)`` copy, for ``x @ w``."""
    return w.detach().t().contiguous()


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w (+ b)`` with ``w`` stored ``(in, out)``: the same values as ``F.linear(x, w.T, b)``."""
    y = x @ w
    return y if b is None else y + b


def _bias(linear: torch.nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


@dataclass
class _Block:
    """One decoder layer's weights, fused. Shapes are per layer: a pruned layer has fewer heads/channels."""

    ln1: torch.Tensor  # (hidden,)
    wqkv: torch.Tensor  # (hidden, (nq + 2 nkv) · head_dim): transposed, applied as x @ w
    bqkv: torch.Tensor | None
    nq: int
    nkv: int
    wo: torch.Tensor  # (nq · head_dim, hidden)
    ln2: torch.Tensor
    w_gate_up: torch.Tensor  # (hidden, 2 · inter)
    inter: int
    wd: torch.Tensor  # (inter, hidden)
    bo: torch.Tensor | None = None  # (hidden,) o_proj / down_proj biases: absent in HF Llama, added by
    bd: torch.Tensor | None = None  # bias compensation (FLAP) or present in other architectures


class FastDecoder:
    """Greedy decoding with a static KV cache for LLaMA-family models, dense or pruned.

    Prompts in one batch must have the same length (no padding); that is what the benchmark needs and it keeps
    the loop free of masks. Results equal HF ``generate(do_sample=False)`` token for token (tested).
    """

    def __init__(self, model, max_batch: int = 1, max_len: int = 1024, compile: bool = False,
                 cuda_graph: bool | None = None, static: bool | None = None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner = base.model
        cfg = base.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = _transposed(base.lm_head.weight)  # (hidden, vocab): a copy, also when tied
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.blocks = []
        for layer in decoder_layers(base):
            at, mlp = layer.self_attn, layer.mlp
            nq = at.q_proj.out_features // self.head_dim
            nkv = at.k_proj.out_features // self.head_dim
            biases = [p.bias for p in (at.q_proj, at.k_proj, at.v_proj)]
            self.blocks.append(_Block(
                ln1=layer.input_layernorm.weight,
                wqkv=_transposed(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])),
                bqkv=torch.cat(biases).detach() if biases[0] is not None else None,
                nq=nq, nkv=nkv, wo=_transposed(at.o_proj.weight), ln2=layer.post_attention_layernorm.weight,
                w_gate_up=_transposed(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                inter=mlp.gate_proj.out_features, wd=_transposed(mlp.down_proj.weight),
                bo=_bias(at.o_proj), bd=_bias(mlp.down_proj)))
        self.max_batch, self.max_len = max_batch, max_len
        # (batch, kv_heads, max_len, head_dim) per layer, allocated once
        self.k_cache = [torch.zeros(max_batch, b.nkv, max_len, self.head_dim, dtype=self.dtype, device=self.device)
                        for b in self.blocks]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        pos = torch.arange(max_len, device=self.device)[None]
        with torch.no_grad():
            cos, sin = inner.rotary_emb(self.embed[:1][None], pos)
        half = self.head_dim // 2
        # (max_len, 1, head_dim): broadcast over heads of (batch, T, heads, head_dim). The sine's first half is
        # negated so that rotate_half(x) * sin == roll(x, half) * sin_signed: one op instead of four.
        self.cos = cos[0][:, None]
        self.sin = torch.cat([-sin[0][:, :half], sin[0][:, half:]], dim=-1)[:, None]
        self._forward = torch.compile(self._forward_impl, dynamic=True) if compile else self._forward_impl
        # Decode steps: on CUDA one step is captured once as a CUDA graph and replayed (no Python or launch
        # overhead per token); that needs static shapes, so the step attends over the whole cache with a mask.
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and not on_cuda:
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.static = self.cuda_graph if static is None else (static or self.cuda_graph)
        self._positions = torch.arange(max_len, device=self.device)
        self._graphs: dict[int, tuple] = {}

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # as LlamaRMSNorm: statistics in fp32, weight applied in the model dtype (one op when that is fp32)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, eps=self.eps)
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _qkv(self, x: torch.Tensor, b: _Block, cos: torch.Tensor, sin: torch.Tensor):
        """Project and rotate: q (batch, nq, T, hd), k and v (batch, nkv, T, hd).

        Queries and keys get their rotary embedding in one pass, as one (batch, T, nq + nkv, hd) view.
        """
        bsz, T, _ = x.shape
        qkv = _lin(x, b.wqkv, b.bqkv).view(bsz, T, b.nq + 2 * b.nkv, self.head_dim)
        qk = qkv[:, :, :b.nq + b.nkv]
        qk = torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, dims=-1), sin)
        return (qk[:, :, :b.nq].transpose(1, 2), qk[:, :, b.nq:].transpose(1, 2),
                qkv[:, :, b.nq + b.nkv:].transpose(1, 2))

    def _forward_impl(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Run tokens ``ids`` (batch, T) at positions pos..pos+T-1; return last-position logits (batch, vocab)."""
        bsz, T = ids.shape
        hd = self.head_dim
        h = F.embedding(ids, self.embed)  # (batch, T, hidden)
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]  # (T, 1, head_dim)
        for i, b in enumerate(self.blocks):
            q, k, v = self._qkv(self._rms(h, b.ln1), b, cos, sin)
            self.k_cache[i][:bsz, :, pos:pos + T] = k
            self.v_cache[i][:bsz, :, pos:pos + T] = v
            keys, values = self.k_cache[i][:bsz, :, :pos + T], self.v_cache[i][:bsz, :, :pos + T]
            a = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1, enable_gqa=b.nq != b.nkv)
            h = h + _lin(a.transpose(1, 2).reshape(bsz, T, b.nq * hd), b.wo, b.bo)
            g, u = _lin(self._rms(h, b.ln2), b.w_gate_up).split(b.inter, dim=-1)
            h = h + _lin(F.silu(g) * u, b.wd, b.bd)
        return _lin(self._rms(h[:, -1], self.norm), self.lm_head)  # (batch, vocab)

    def _step_static(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step with static shapes: ``ids`` (batch, 1) at position ``pos`` (a (1,) tensor)."""
        bsz, hd = ids.shape[0], self.head_dim
        h = F.embedding(ids, self.embed)  # (batch, 1, hidden)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # (1, 1, head_dim)
        visible = (self._positions <= pos).view(1, 1, 1, -1)  # (1, 1, 1, max_len): the filled cache slots
        for i, b in enumerate(self.blocks):
            q, k, v = self._qkv(self._rms(h, b.ln1), b, cos, sin)
            keys, values = self.k_cache[i][:bsz], self.v_cache[i][:bsz]  # (batch, nkv, max_len, hd)
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=b.nq != b.nkv)
            h = h + _lin(a.transpose(1, 2).reshape(bsz, 1, b.nq * hd), b.wo, b.bo)
            g, u = _lin(self._rms(h, b.ln2), b.w_gate_up).split(b.inter, dim=-1)
            h = h + _lin(F.silu(g) * u, b.wd, b.bd)
        return _lin(self._rms(h[:, -1], self.norm), self.lm_head)

    def _graph_for(self, bsz: int):
        """Capture (once per batch size) the static decode step as a CUDA graph over static input buffers."""
        if bsz not in self._graphs:
            ids = torch.zeros(bsz, 1, dtype=torch.long, device=self.device)
            pos = torch.zeros(1, dtype=torch.long, device=self.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (it writes cache slot 0; prefill overwrites)
                for _ in range(2):
                    self._step_static(ids, pos)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step_static(ids, pos)
            self._graphs[bsz] = (graph, ids, pos, out)
        return self._graphs[bsz]

    def _decode(self, nxt: torch.Tensor, pos: int) -> torch.Tensor:
        if self.cuda_graph:
            graph, ids, pos_buf, out = self._graph_for(nxt.shape[0])
            ids.copy_(nxt)
            pos_buf.fill_(pos)
            graph.replay()
            return out
        if self.static:
            return self._step_static(nxt, torch.tensor([pos], device=self.device))
        return self._forward(nxt, pos)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: returns (batch, prompt + max_new_tokens) token ids."""
        bsz, T = input_ids.shape
        if bsz > self.max_batch or T + max_new_tokens > self.max_len:
            raise ValueError(f"batch {bsz} × length {T + max_new_tokens} exceeds the decoder's static cache "
                             f"({self.max_batch} × {self.max_len}); build FastDecoder with larger max_batch/max_len")
        if self.cuda_graph:
            self._graph_for(bsz)  # capture before prefill: the warm-up writes cache slot 0
        out = [input_ids]
        nxt = self._forward(input_ids.to(self.device), 0).argmax(-1, keepdim=True)
        for step in range(max_new_tokens - 1):
            out.append(nxt)
            nxt = self._decode(nxt, T + step).argmax(-1, keepdim=True)
        out.append(nxt)
        return torch.cat([o.to(input_ids.device) for o in out], dim=1)


# ------------------------------------------------------------------------------------------ measuring
def macs_per_token(model) -> int:
    """Multiply-accumulates of the linear layers for one token (attention over the context excluded)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def size(model, name: str) -> dict:
    """What a model costs on any machine: parameters, multiply-accumulates per token, weight memory (MiB)."""
    return {"model": name, "params": count_parameters(model), "macs_per_token": macs_per_token(model),
            "weights_MiB": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def _read(m):
    """A value of a ``models`` dict as a model: a model as it is, a loader (a function of no arguments returning
    one) called now. The caller drops it before reading the next, so a dict of loaders never holds two models."""
    return m if isinstance(m, torch.nn.Module) else m()


def _free(device: torch.device) -> None:
    """Give a dropped model's memory back now: HF models sit in reference cycles, which only the collector frees."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sizes(models: dict) -> list[dict]:
    """``size`` of each model (a model, or a loader: one in memory at a time), with the share of parameters
    removed against the first."""
    rows = []
    for name, loader in models.items():
        m = _read(loader)
        rows.append(size(m, name))
        device = next(m.parameters()).device
        del m
        _free(device)
    return with_share_removed(rows)


def with_share_removed(rows: list[dict]) -> list[dict]:
    """Each row with ``share_removed``, the share of its parameters removed against the first row's."""
    return [r | {"share_removed": 1 - r["params"] / rows[0]["params"]} for r in rows]


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


@torch.inference_mode()
def _hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _cases(model, name: str, prompt_len: int, new_tokens: int, batches, prefill_len: int, eager: bool,
           compile: bool) -> tuple[dict, list[tuple[str, object, int]]]:
    """The static facts of one model, and its timed cases ``(key, fn, tokens)`` (tokens 0: report milliseconds).

    Each decode case comes with its prompt's prefill (``generate`` of one token: the prompt's forward pass
    and the first token read off it); ``compare`` subtracts that time, so decode tokens/s count decode
    steps alone and the prefill is reported on its own.
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)  # every model gets the same inputs
    row = size(model, name)
    ids = torch.randint(0, vocab, (1, prefill_len), generator=gen).to(device)

    def prefill():
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)

    cases = [("prefill_ms", prefill, 0)]
    # one decoder for every batch size: its fused, transposed weights are a copy of the model's, made once
    fast = FastDecoder(model, max_batch=max(batches), max_len=prompt_len + new_tokens, compile=compile)
    for bsz in batches:
        prompt = torch.randint(0, vocab, (bsz, prompt_len), generator=gen).to(device)
        cases.append((f"prompt_prefill_ms_bs{bsz}", partial(fast.generate, prompt, 1), 0))
        cases.append((f"decode_tok_s_bs{bsz}", partial(fast.generate, prompt, new_tokens), bsz * (new_tokens - 1)))
        if eager:
            cases.append((f"hf_prompt_prefill_ms_bs{bsz}", partial(_hf_generate, model, prompt, 1), 0))
            cases.append((f"hf_decode_tok_s_bs{bsz}", partial(_hf_generate, model, prompt, new_tokens),
                          bsz * (new_tokens - 1)))
    return row, cases


def measure(model, name: str, prompt_len: int = 128, new_tokens: int = 32, batches=(1, 16),
            prefill_len: int = 512, repeats: int = 3, eager: bool = True, compile: bool = False) -> dict:
    """Parameters, MACs, weight memory, prefill latency and decode tokens/s of one model."""
    return compare({name: model}, prompt_len=prompt_len, new_tokens=new_tokens, batches=batches,
                   prefill_len=prefill_len, repeats=repeats, eager=eager, compile=compile)[0]


def compare(models: dict, prompt_len: int = 128, new_tokens: int = 32, batches=(1, 16), prefill_len: int = 512,
            repeats: int = 3, eager: bool = True, compile: bool = False) -> list[dict]:
    """Measure several models side by side (same process, same inputs); add speed-ups against the first.

    Measurements are interleaved: each repeat times every case of every model in turn, and each figure is the
    median over repeats (after one warm-up run of each case). A burst of load on a shared machine then hits
    dense and pruned alike instead of whichever model happened to be measured during it.

    Decode tokens/s are of the decode steps alone: ``batch × (new_tokens − 1)`` tokens over the median time of
    generating ``new_tokens`` minus the median time of the prompt's prefill (``prompt_prefill_ms_bs<b>``,
    reported beside them; the first new token is read off the prefill).

    A value of ``models`` may be a loader instead (a function of no arguments returning the model): then the
    models are measured one after the other, each loaded, warmed up, timed ``repeats`` times and freed before
    the next is read, so no two are in memory at once (a 24 GB GPU holds a LLaMA-7B and one pruned copy, not
    three models). The price is the interleaving: a burst of load hits one model only. Rows say which way they
    were measured (``interleaved``).
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: decode speed needs at least 2 new tokens (the first comes "
                         "from the prompt's prefill)")
    interleaved = all(isinstance(m, torch.nn.Module) for m in models.values())
    times: dict[tuple[int, str], list[float]] = {}
    built = []

    def timed_rounds(group):  # group: [(index, cases, device)]; warm-up, then repeats, interleaved in the group
        for _, cases, _ in group:
            for _, fn, _ in cases:  # warm-up: allocations, CUDA graph capture, kernel selection
                fn()
        for _ in range(repeats):
            for i, cases, device in group:
                for key, fn, _ in cases:
                    times.setdefault((i, key), []).append(_timed(fn, device))

    if interleaved:
        built = [_cases(m, name, prompt_len, new_tokens, batches, prefill_len, eager, compile)
                 for name, m in models.items()]
        timed_rounds([(i, cases, next(m.parameters()).device)
                      for i, ((_, cases), m) in enumerate(zip(built, models.values()))])
    else:
        for i, (name, loader) in enumerate(models.items()):
            m = _read(loader)
            device = next(m.parameters()).device
            row, cases = _cases(m, name, prompt_len, new_tokens, batches, prefill_len, eager, compile)
            timed_rounds([(i, cases, device)])
            built.append((row, [(key, None, tokens) for key, _, tokens in cases]))  # the model goes with cases
            del m, cases
            _free(device)
    rows = []
    for i, (row, cases) in enumerate(built):
        median = {key: sorted(times[i, key])[len(times[i, key]) // 2] for key, _, _ in cases}
        for key, _, tokens in cases:
            if tokens:  # a decode case: its prompt's prefill (same path, same batch) taken off
                prefill = median[key.replace("decode_tok_s", "prompt_prefill_ms")]
                row[key] = tokens / max(median[key] - prefill, 1e-9)
            else:
                row[key] = 1000 * median[key]
        row["repeats"] = repeats
        row["interleaved"] = interleaved
        rows.append(row)
    rows = with_share_removed(rows)
    base = rows[0]
    for r in rows:
        for key in [k for k in r if k.startswith(("decode", "hf_decode"))]:
            r[f"{key}_speedup"] = r[key] / base[key]
        r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
    return rows


def format_table(rows: list[dict]) -> str:
    keys = ["model", "params", "share_removed", "macs_per_token", "weights_MiB", "prefill_ms", "prefill_speedup"]
    keys += sorted(k for k in rows[0] if "tok_s" in k or "prompt_prefill" in k)
    lines = [" | ".join(keys)]
    for r in rows:
        lines.append(" | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys))
    return "\n".join(lines)


IDLE_LOAD = 0.25  # 1-minute load average per CPU under which the machine counts as idle


def machine_load() -> dict:
    """The machine's load right now: 1- and 5-minute load averages and the CPUs, for recording beside timings."""
    load1, load5, _ = os.getloadavg()
    cpus = os.cpu_count() or 1
    return {"load1": round(load1, 2), "load5": round(load5, 2), "cpus": cpus, "idle": load1 / cpus < IDLE_LOAD}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailored bench", description="dense vs pruned speed, side by side")
    parser.add_argument("models", nargs="+", help="model specs: smollm2-135m, tiny, a pruned checkpoint dir, an HF dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-eager", action="store_true", help="skip HF generate (slow) as the reference")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--allow-busy", action="store_true",
                        help="time even when the machine is busy (the output says so); refused otherwise")
    args = parser.parse_args(argv)
    before = machine_load()
    if args.device == "cpu" and not before["idle"] and not args.allow_busy:
        print(f"tailored bench: the machine is busy (load {before['load1']} on {before['cpus']} CPUs): CPU timings "
              "now would say more about the other jobs than about pruning. Wait for it to be idle, or pass "
              "--allow-busy to time anyway (the output is then marked busy).", file=sys.stderr)
        return 1
    models = {spec: load(spec, device=args.device, dtype=args.dtype)[0] for spec in args.models}
    rows = compare(models, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                   batches=tuple(int(b) for b in args.batches.split(",")), prefill_len=args.prefill_len,
                   repeats=args.repeats, eager=not args.no_eager, compile=args.compile)
    after = machine_load()
    busy = args.device == "cpu" and not (before["idle"] and after["idle"])
    print(format_table(rows))
    print(f"load average {before['load1']} before, {after['load1']} after, {before['cpus']} CPUs"
          + ("  (BUSY: not a clean measurement)" if busy else ""))
    if args.json:
        write_json(args.json, {"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "load_before": before, "load_after": after,
                               "busy": busy, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
