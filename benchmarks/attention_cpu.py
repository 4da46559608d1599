"""Experiment (issue 18): float attention as ONNX Runtime's ``MultiHeadAttention`` on the CPU.

The attention products and softmax stay float in the INT8 CPU build and take ~35 % of its step
(``profile_cpu.py``). ONNX Runtime's CPU provider has a ``com.microsoft.MultiHeadAttention``
kernel that computes softmax(Q·Kᵀ·scale)·V in one op. ONNX Runtime's own U-Net optimizer does
not match a Q/DQ export (it folds the q/k/v projections into the fused node and so needs them as
float ``MatMul`` with initializer weights), so
:func:`fuse_cpu_attention` here replaces only the core on the already projected Q, K, V (an
experiment: it gained 5-7 % of an INT8 step, below the 10 % that would have put it into the
CPU engine stage; benchmarks/RESULTS.md). This script fuses each given graph, then times one U-Net step of every
graph with and without the fusion, round-robin (one call of each per round), and gives each
fused graph's relative L2 to its unfused output. The first model is the baseline family (FP32):
ratios are against its fastest variant.

    python benchmarks/attention_cpu.py FP32.onnx INT8.onnx --labels fp32 int8 --threads 2 1
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adm_export.engines.onnxruntime.fusions import declare_contrib_domain
from adm_export.export.onnx_graph import node_attr


# -- the graph pass ------------------------------------------------------------------------------------
def _heads(reshape, inits: dict, prod: dict) -> int | None:
    """Heads of a ``Reshape`` to ``[B, S, heads, head_dim]``: the shape's third entry, a constant."""
    from adm_export.export.onnx_graph import _constant as _const

    shape = _const(reshape.input[1], inits, prod)
    if shape is not None:
        return int(shape[2]) if shape.size == 4 and shape[2] > 0 else None
    concat = prod.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    value = _const(concat.input[2], inits, prod)
    return int(value.reshape(-1)[0]) if value is not None and value.size == 1 and value.reshape(-1)[0] > 0 else None


class _Graph:
    """Producer/consumer lookups for matching a chain of ops (no rewriting)."""

    def __init__(self, graph):
        self.inits = {i.name: i for i in graph.initializer}
        self.prod = {o: n for n in graph.node for o in n.output}
        self.cons: dict[str, list] = collections.defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.cons[i].append(n)

    def parent(self, name: str, op: str, perm: list[int] | None = None):
        """The producer of ``name`` if it is an ``op`` (with that ``perm`` for a Transpose), skipping
        no-op ``Cast`` to FP32 (diffusers' ``upcast_softmax`` in an FP32 graph)."""
        node = self.prod.get(name)
        while node is not None and node.op_type == "Cast" and node_attr(node, "to") == 1 and op != "Cast":
            node = self.prod.get(node.input[0])
        if node is None or node.op_type != op or (perm is not None and list(node_attr(node, "perm") or []) != perm):
            return None
        return node

    def only_child(self, name: str, op: str, perm: list[int] | None = None):
        """The single consumer of ``name`` if it is an ``op`` (skipping no-op ``Cast`` to FP32).

        ``Shape`` consumers do not count: they read the shape only (diffusers' ``batch_to_head_dim``
        takes its target shape from the tensor it reshapes).
        """
        users = [u for u in self.cons.get(name, []) if u.op_type != "Shape"]
        while len(users) == 1 and users[0].op_type == "Cast" and node_attr(users[0], "to") == 1 and op != "Cast":
            users = [u for u in self.cons.get(users[0].output[0], []) if u.op_type != "Shape"]
        if len(users) != 1 or users[0].op_type != op:
            return None
        if perm is not None and list(node_attr(users[0], "perm") or []) != perm:
            return None
        return users[0]

    def split_heads(self, name: str, transposed: bool, classic: bool):
        """The projection a head-split tensor comes from: ``(projected tensor, heads)`` or ``None``.

        classic (diffusers' ``head_to_batch_dim``): ``Reshape[B*H,S,D] <- Transpose[0,2,1,3] <-
        Reshape[B,S,H,D]``, keys then ``Transpose[0,2,1]``; scaled dot-product attention (torch's
        SDPA export): ``Transpose[0,2,1,3] <- Reshape[B,S,H,D]``, keys ``Transpose[0,2,3,1]``.
        """
        if classic:
            if transposed:
                t = self.parent(name, "Transpose", [0, 2, 1])
                if t is None:
                    return None
                name = t.input[0]
            r3 = self.parent(name, "Reshape")
            t4 = self.parent(r3.input[0], "Transpose", [0, 2, 1, 3]) if r3 is not None else None
        else:
            t4 = self.parent(name, "Transpose", [0, 2, 3, 1] if transposed else [0, 2, 1, 3])
        r4 = self.parent(t4.input[0], "Reshape") if t4 is not None else None
        heads = _heads(r4, self.inits, self.prod) if r4 is not None else None
        return (r4.input[0], heads) if heads else None


def _scores(g: _Graph, softmax):
    """``(q, k, scale)`` of ``Softmax(scores)``: classic ``Mul(MatMul(q, k), alpha)`` (a zero
    ``Add`` allowed: an unfolded ``baddbmm`` bias), or SDPA's ``MatMul(Mul(q, s), Mul(k, s))``
    with ``s = sqrt(1/sqrt(D))`` (``scale`` ``None``: MultiHeadAttention's default 1/sqrt(D))."""
    from adm_export.export.onnx_graph import _all_zero
    from adm_export.export.onnx_graph import _constant as _const

    name = softmax.input[0]
    add = g.parent(name, "Add")
    if add is not None:  # a mask (a real bias) is not fused
        zero = [i for i in add.input if _all_zero(i, g.inits, g.prod)]
        if len(zero) != 1:
            return None
        name = next(i for i in add.input if i != zero[0])
    mul = g.parent(name, "Mul")
    if mul is not None:
        for k in (0, 1):
            matmul, alpha = g.parent(mul.input[k], "MatMul"), _const(mul.input[1 - k], g.inits, g.prod)
            if matmul is not None and alpha is not None and alpha.size == 1:
                return matmul.input[0], matmul.input[1], float(alpha.reshape(-1)[0]), True
        return None
    matmul = g.parent(name, "MatMul")
    if matmul is None:
        return None
    sides = []
    for k in (0, 1):
        m = g.parent(matmul.input[k], "Mul")
        if m is None:
            return None
        # The factor must be torch's sqrt(1/sqrt(head_dim)), computed from the shape (default scale).
        factor = [i for i in m.input if (p := g.prod.get(i)) is not None and p.op_type == "Sqrt"]
        if len(factor) != 1:
            return None
        sides.append(next(i for i in m.input if i != factor[0]))
    return sides[0], sides[1], None, False


def _match_attention(g: _Graph, softmax):
    """The MultiHeadAttention replacing the attention core around ``softmax``, or ``None``."""
    from onnx import helper

    if softmax.op_type != "Softmax" or node_attr(softmax, "axis") not in (None, -1, 2, 3):
        return None
    scores = _scores(g, softmax)
    av = g.only_child(softmax.output[0], "MatMul")
    if scores is None or av is None:
        return None
    q_name, k_name, scale, classic = scores
    q = g.split_heads(q_name, False, classic)
    k = g.split_heads(k_name, True, classic)
    v = g.split_heads(av.input[1], False, classic)
    if None in (q, k, v) or not q[1] == k[1] == v[1]:
        return None
    # Merge heads: classic Reshape[B,H,S,D] -> Transpose[0,2,1,3] -> Reshape[B,S,H*D]; SDPA
    # Transpose[0,2,1,3] -> Reshape[B,S,H*D].
    name = av.output[0]
    if classic:
        r4 = g.only_child(name, "Reshape")
        if r4 is None:
            return None
        name = r4.output[0]
    t = g.only_child(name, "Transpose", [0, 2, 1, 3])
    out = g.only_child(t.output[0], "Reshape") if t is not None else None
    if out is None:
        return None
    attrs = {"num_heads": q[1]} | ({"scale": scale} if scale is not None else {})
    return out, helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [out.output[0]],
                                 name=f"{out.name}/MultiHeadAttention", domain="com.microsoft", **attrs)


def fuse_cpu_attention(model) -> int:
    """Compute each unmasked float attention core with ONNX Runtime's ``MultiHeadAttention``, in place.

    The quantized CPU engine keeps attention's products and softmax in float (integer attention
    MatMuls were no faster at head dim 32), and there they took ~35 % of an INT8 U-Net step
    (``benchmarks/profile_cpu.py``). ONNX Runtime's own attention fusion cannot be used: it
    folds the q/k/v projections into the fused node, so it needs them as float ``MatMul`` with
    initializer weights, which a Q/DQ export does not have (and folding them would undo their
    integer kernels). So only the core is replaced: from the projected ``Q``, ``K``, ``V``
    (``[B, S, heads*D]``, whatever computes them) through the head split, ``Q·Kᵀ·scale``, softmax,
    ``·V`` and the head merge, by ``MultiHeadAttention(Q, K, V, num_heads, scale)`` — same
    arithmetic (measured 6e-7 relative on the FP32 AudioLDM-S U-Net), without the B×heads×L×L
    score tensor in memory (the CPU kernel's flash path). Both diffusers' classic attention and
    torch's scaled-dot-product export are matched; a masked attention (non-zero bias) is left alone.
    Dead nodes are removed.

    Returns:
        Number of attention blocks fused.
    """
    from adm_export.export.onnx_graph import remove_dead_nodes

    graph = model.graph
    g = _Graph(graph)
    replace = {}
    for node in graph.node:
        match = _match_attention(g, node) if node.op_type == "Softmax" else None
        if match is not None:
            replace[id(match[0])] = match[1]
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    remove_dead_nodes(model)
    del graph.value_info[:]
    declare_contrib_domain(model)
    return len(replace)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="ONNX U-Net exports (same inputs).")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=256, help="Latent frames (256 = 10.24 s).")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--iters", type=int, default=8, help="Timed rounds.")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-flash", action="store_true",
                   help="Also time each fused graph with ONNX Runtime's CPU flash attention off "
                        "(ORT_DISABLE_FLASH_ATTENTION=1: the kernel's softmax(QK^T)V with a score buffer).")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def inputs_for(sess, batch: int, frames: int) -> dict:
    """Seeded inputs: the symbolic dims 'batch'/'frames' take the given values."""
    rng = np.random.default_rng(1)
    feed = {}
    for i in sess.get_inputs():
        shape = [batch if d == "batch" else frames if d == "frames" else d for d in i.shape]
        if i.name == "timestep":
            feed[i.name] = np.full(shape, 500.0, np.float32)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def main(argv=None) -> int:
    import onnx
    import onnxruntime as ort

    from benchmarks import speed_common as sc

    args = parse_args(argv)
    labels = args.labels or [p.stem for p in args.models]
    results = {"env": sc.environment("cpu"), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for label, path in zip(labels, args.models):
            model = onnx.load(str(path))
            paths[label] = path
            n = fuse_cpu_attention(model)
            fused = Path(tmp) / f"{label}_mha.onnx"
            onnx.save(model, str(fused))
            paths[f"{label}+mha"] = fused
            print(f"{label}: {n} attention blocks fused", flush=True)
            del model
        for threads in args.threads:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            sessions = {k: ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"])
                        for k, p in paths.items()}
            if args.no_flash:
                # The kernel reads the variable when the session creates it.
                os.environ["ORT_DISABLE_FLASH_ATTENTION"] = "1"
                for k in [k for k in paths if k.endswith("+mha")]:
                    sessions[f"{k}-noflash"] = ort.InferenceSession(str(paths[k]), sess_options=so,
                                                                    providers=["CPUExecutionProvider"])
                del os.environ["ORT_DISABLE_FLASH_ATTENTION"]
            feed = inputs_for(next(iter(sessions.values())), args.batch, args.frames)
            outs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
            times: dict[str, list[float]] = {k: [] for k in sessions}
            load_before = sc.cpu_load()
            for r in range(args.warmup + args.iters):
                for k, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    if r >= args.warmup:
                        times[k].append((time.perf_counter() - t0) * 1000)
            load_after = sc.cpu_load()
            base = min((k for k in sessions if k.startswith(labels[0])), key=lambda k: statistics.median(times[k]))
            print(f"\n{threads} thread(s), load {load_before} -> {load_after}; baseline = {base}")
            for k in sessions:
                med = statistics.median(times[k])
                paired = statistics.median(b / t for b, t in zip(times[base], times[k]))
                plain = k.split("+")[0]
                rel = float(np.linalg.norm(outs[k] - outs[plain]) / np.linalg.norm(outs[plain]))
                ref = outs[labels[0]]
                rel_ref = float(np.linalg.norm(outs[k] - ref) / np.linalg.norm(ref))
                row = {"threads": threads, "graph": k, "median_ms": round(med, 1), "min_ms": round(min(times[k]), 1),
                       "x_base_medians": round(statistics.median(times[base]) / med, 3),
                       "x_base_paired": round(paired, 3), "rel_l2_vs_unfused": rel,
                       f"rel_l2_vs_{labels[0]}": rel_ref, "times_ms": times[k], "baseline": base,
                       "load": [load_before, load_after]}
                results["rows"].append(row)
                print(f"  {k:12s} median {med:8.1f} ms  min {min(times[k]):8.1f}  x{base} {row['x_base_medians']:.3f} "
                      f"(paired {paired:.3f})  rel.L2 vs unfused {rel:.2e}, vs {labels[0]} {rel_ref:.2e}", flush=True)
            del sessions
    if args.out:
        sc.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
