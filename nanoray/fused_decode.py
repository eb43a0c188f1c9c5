"""The serving engine's decode step in Triton: a few fused kernels a layer, per-row positions read on the device.

One step feeds one token per KV-cache slot (row b at position pos_B[b]) through the GPT of nanoray.model, with
the math and bf16 roundings of its per-row cache path, then samples the next token of every row:

    embed    x0 = norm(wte[idx]) + smear · previous normed embedding; x = layer 0's resid/x0 mix     (_embed)
    a layer  qkv = norm(x) @ W_qkv                                                  (_linear, prologue RMSNorm)
             y = attention: rotary + QK-norm + value-embedding gate, K/V written at pos, the row's cache split
             over positions (flash-decoding: no length bucket, no mask), the last split merging them  (_attention)
             x += y @ W_o                                 (_linear, epilogue residual)
             h = relu(norm(x) @ W_fc)²                    (_linear, prologue RMSNorm, epilogue ReLU²)
             x += h @ W_proj, then the next layer's mix   (_linear, epilogue residual + mix)
    head     logits = softcap(norm(x - λ·backout) @ W_lm), with each block's max, sum-exp and argmax
    sample   Gumbel-max over top-k/top-p (nanoray.engine.sample's math, hashed noise), log-prob of the pick,
             and the next step's inputs (token, position, step) written on the device          (_pick)

So a step of up to `narrow_rows` rows is 5 kernels a layer plus 3 (greedy) and needs no host work: the engine
captures several steps in one CUDA graph. On Hopper and later the kernels run under programmatic dependent launch
(PDL): each starts while the previous one finishes and waits for it only before reading its output, so launch and
ramp overlap, and a GEMV's weights (nobody's output) stream in meanwhile. `_linear` is a GEMV for one row (products
summed lane-wise, one reduction at the end) and a GEMM (tl.dot, `gemm_tiles`) for more. Wider steps run the GEMMs
on cuBLAS, with the norms and mixes as kernels of their own (nanoray.kernels' mix_norm), the same attention and
sampler. The attention (_attention_kernel) runs one program per kv group and split, both of its products on tensor
cores (tl.dot); dev/check_fused_decode.py checks it under Triton's interpreter against the model.
GPU only (bf16, Triton); the engine's other decode paths are the plain PyTorch model, which the GPU tests
compare this one against.

Shape legend: B rows (slots) in the step, D width, H heads, KVH kv heads, G = H / KVH, C head dim, S splits.
"""

import math
import os

import torch

from nanoray import kernels
from nanoray.model import QK_GAIN, SMEAR_CHANNELS, SOFTCAP, VE_GATE_CHANNELS

triton = kernels.triton
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if triton is not None:
    import triton.language as tl

    # Triton's CPU interpreter (TRITON_INTERPRET=1, for checking these kernels without a GPU) multiplies bf16
    # tl.dot operands as raw bits: there the skinny GEMM runs in fp32.
    _DOT_FP32 = tl.constexpr(_INTERPRET)

MAX_SPLITS = 64  # attention splits per row at most (the shortest split covers seq_len / 64 positions)


def available(device: torch.device) -> bool:
    return device.type == "cuda" and triton is not None and torch.cuda.get_device_capability(device) >= (8, 0)


if triton is not None:
    @triton.jit
    def _bf(x):
        """Round fp32 to bf16 and back: the rounding of one bf16 op of the PyTorch model."""
        return x.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _pdl_start(PDL: tl.constexpr):
        """Under programmatic dependent launch (PDL, Hopper and later): wait until the previous kernel has finished and
        its writes are visible, then let the next kernel launch, so its start overlaps this one's run (it waits in
        turn before reading anything). Only what no earlier kernel writes may be read before this."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _hash32(x):
        """nanoray.engine._hash32 on int64 lanes (products stay below 2**63)."""
        x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 0x2C1B3C6D) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _embed_kernel(idx_ptr, wte_ptr, smear_w_ptr, smear_lam_ptr, prev_ptr, x0_ptr, x_ptr, lam_ptr, D, eps,
                      SMEAR: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SM: tl.constexpr, PDL: tl.constexpr):
        _pdl_start(PDL)
        b = tl.program_id(0).to(tl.int64)
        tok = tl.load(idx_ptr + b)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        e = tl.load(wte_ptr + tok * D + d, mask=dm, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(e * e, axis=0) / D + eps)
        x0n = _bf(e * rstd)
        sm = tl.arange(0, BLOCK_SM)
        smm = sm < SMEAR
        head = _bf(tl.load(wte_ptr + tok * D + sm, mask=smm, other=0.0).to(tl.float32) * rstd)
        logit = _bf(tl.sum(head * tl.load(smear_w_ptr + sm, mask=smm, other=0.0).to(tl.float32), axis=0))
        gate = _bf(tl.load(smear_lam_ptr).to(tl.float32) * _bf(_sigmoid(logit)))
        prev = tl.load(prev_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
        tl.store(prev_ptr + b * D + d, x0n.to(tl.bfloat16), mask=dm)
        x0 = _bf(x0n + _bf(gate * prev))
        tl.store(x0_ptr + b * D + d, x0.to(tl.bfloat16), mask=dm)
        x = tl.load(lam_ptr) * x0 + tl.load(lam_ptr + 1) * x0
        tl.store(x_ptr + b * D + d, x.to(tl.bfloat16), mask=dm)

    @triton.jit
    def _input_rows(x_ptr, bo_ptr, bl_ptr, rows, cols, mask, K, PRO: tl.constexpr):
        """Rows of the residual stream (minus λ·backout for PRO 2), in fp32 with the model's bf16 roundings."""
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if PRO == 2:
            bo = tl.load(bo_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = _bf(x - _bf(tl.load(bl_ptr).to(tl.float32) * bo))
        return x

    @triton.jit
    def _weight_tile(w_ptr, rn, rk, n_mask, K):
        return tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0)

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, out_ptr, M, N, K,
                       res_ptr, x0_ptr, lam_ptr, save_ptr, bo_ptr, bl_ptr, xn_ptr, stats_ptr, eps, softcap,
                       PRO: tl.constexpr, EPI: tl.constexpr, MIX: tl.constexpr, SAVE: tl.constexpr,
                       STORE_XN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """out = epilogue(prologue(x) @ wᵀ) for rows < M, columns < N; w is (N, K) bf16, row-major.
        PRO 0: x as is; 1: RMSNorm of x's rows; 2: RMSNorm of x - λ·backout. EPI 0: bf16; 1: ReLU²;
        2: out = x + y in place (SAVE: a copy to save_ptr; MIX: then the next layer's resid/x0 mix);
        3: softcapped fp32 logits and per-block (max, sum-exp, argmax) for the sampler. STORE_XN: the first
        column block writes the normed rows. PDL: a GEMV (BLOCK_M 1) loads its first weight tile (no kernel's
        output) before the wait for the previous kernel, so it reads weights while that kernel finishes. The
        skinny GEMM (BLOCK_M 16) does not: a loop-carried tile made its 8-row step 1.4x slower on an H200."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_mask = rm < M
        n_mask = rn < N
        if PDL and BLOCK_M == 1:
            w = _weight_tile(w_ptr, rn, tl.arange(0, BLOCK_K), n_mask, K)
        _pdl_start(PDL)
        if PRO == 1 or PRO == 2:
            sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                a = _input_rows(x_ptr, bo_ptr, bl_ptr, rm, rk, m_mask[:, None] & (rk < K)[None, :], K, PRO)
                sumsq += tl.sum(a * a, axis=1)
            rstd = 1.0 / tl.sqrt(sumsq / K + eps)
        if BLOCK_M >= 16:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:  # one row: products summed lane-wise, reduced across lanes once after the loop
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < K
            a_mask = m_mask[:, None] & k_mask[None, :]
            if PRO == 0:
                a = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=a_mask, other=0.0)
            else:
                a = (_input_rows(x_ptr, bo_ptr, bl_ptr, rm, rk, a_mask, K, PRO) * rstd[:, None]).to(tl.bfloat16)
                if STORE_XN:
                    tl.store(xn_ptr + rm[:, None] * K + rk[None, :], a, mask=a_mask & (pid_n == 0))
            if not (PDL and BLOCK_M == 1):
                w = _weight_tile(w_ptr, rn, rk, n_mask, K)
            elif k0 > 0:  # the first tile came before the wait
                w = _weight_tile(w_ptr, rn, rk, n_mask, K)
            if BLOCK_M >= 16 and _DOT_FP32:
                acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)))
            elif BLOCK_M >= 16:
                acc += tl.dot(a, tl.trans(w))
            else:
                acc2 += w.to(tl.float32) * a.to(tl.float32)
        if BLOCK_M == 1:
            acc = tl.sum(acc2, axis=1)[None, :]
        y = _bf(acc)  # the bf16 output of F.linear
        off = rm[:, None] * N + rn[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if EPI == 0:
            tl.store(out_ptr + off, y.to(tl.bfloat16), mask=mask)
        elif EPI == 1:
            r = tl.maximum(y, 0.0)
            tl.store(out_ptr + off, (r * r).to(tl.bfloat16), mask=mask)
        elif EPI == 2:
            x = _bf(tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32) + y)
            if SAVE:
                tl.store(save_ptr + off, x.to(tl.bfloat16), mask=mask)
            if MIX:
                x0 = tl.load(x0_ptr + off, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(lam_ptr) * x + tl.load(lam_ptr + 1) * x0
            tl.store(out_ptr + off, x.to(tl.bfloat16), mask=mask)
        else:
            _softcap_stats(y, out_ptr, stats_ptr, off, mask, m_mask, (rm * tl.num_programs(0) + pid_n) * 3,
                           pid_n * BLOCK_N, softcap)

    @triton.jit
    def _softcap_stats(y, out_ptr, stats_ptr, off, mask, stat_mask, at, col0, softcap):
        """Softcapped fp32 logits of a block y (R, N) at out_ptr + off, and each of its R rows' (max, sum-exp,
        argmax) at stats_ptr + at (R,); col0: the column of each row's first element."""
        z = softcap * _tanh(y / softcap)
        tl.store(out_ptr + off, z, mask=mask)
        z = tl.where(mask, z, -float("inf"))
        top = tl.max(z, axis=1)
        arg = tl.argmax(z, axis=1) + col0
        sum_exp = tl.sum(tl.exp(z - top[:, None]), axis=1)
        tl.store(stats_ptr + at, top, mask=stat_mask)
        tl.store(stats_ptr + at + 1, sum_exp, mask=stat_mask)
        tl.store(stats_ptr + at + 2, arg.to(tl.float32), mask=stat_mask)

    @triton.jit
    def _softcap_kernel(l_ptr, stride_l, out_ptr, stats_ptr, V, n_blocks, softcap, BLOCK_N: tl.constexpr,
                        NB: tl.constexpr):
        """The lm_head epilogue over bf16 logits from a separate GEMM: NB of the sampler's BLOCK_N-wide blocks of
        one row a program, as an (NB, BLOCK_N) tile (a program per block was 80 us a d12 step at 128 rows)."""
        row = tl.program_id(1).to(tl.int64)
        blk = tl.program_id(0) * NB + tl.arange(0, NB)
        rn = blk[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        mask = rn < V
        y = tl.load(l_ptr + row * stride_l + rn, mask=mask, other=0.0).to(tl.float32)
        _softcap_stats(y, out_ptr, stats_ptr, row * V + rn, mask, blk < n_blocks, (row * n_blocks + blk) * 3,
                       blk * BLOCK_N, softcap)

    @triton.jit
    def _relu2_kernel(h_ptr, n, BLOCK: tl.constexpr):
        """h = relu(h)² in place (bf16): the model's relu then square, one pass instead of two."""
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = off < n
        r = tl.maximum(tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32), 0.0)
        tl.store(h_ptr + off, (r * r).to(tl.bfloat16), mask=mask)

    @triton.jit
    def _ve_gate(xn_ptr, gate_w_ptr, b, g, D, VE_CH: tl.constexpr, BLOCK_VE: tl.constexpr):
        """The gate of row b's ResFormer value embedding at kv head g: 3·sigmoid(norm(x)[:12] · w_g), in bf16."""
        vc = tl.arange(0, BLOCK_VE)
        vm = vc < VE_CH
        xg = tl.load(xn_ptr + b * D + vc, mask=vm, other=0.0).to(tl.float32)
        wg = tl.load(gate_w_ptr + g * VE_CH + vc, mask=vm, other=0.0).to(tl.float32)
        return _bf(3.0 * _bf(_sigmoid(_bf(tl.sum(xg * wg, axis=0)))))

    @triton.jit
    def _dot(a, b, acc):
        """acc + a @ b with fp32 accumulation (the interpreter's tl.dot gets fp32 operands, _DOT_FP32)."""
        if _DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def _rope_norm_heads(x, x_swap, cos, sin, eps, gain, C: tl.constexpr):
        """nanoray.model's norm(apply_rotary(x)) * QK_GAIN in bf16, of whole heads x (R, C) at once: x_swap is x with
        each head's halves swapped, cos = [cos, cos] and sin = [sin, -sin] (C,), so bf(bf(x·cos) + bf(x_swap·sin))
        is the model's rotary, rounding for rounding."""
        r = _bf(_bf(x * cos[None, :]) + _bf(x_swap * sin[None, :]))
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / C + eps)
        return _bf(_bf(r * rstd[:, None]) * gain)

    @triton.jit
    def _kv_tile(kc, vcache, j, live, C: tl.constexpr):
        """Positions j of one kv head's cache, keys and values (J, C), zero where not live."""
        at = j[:, None] * C + tl.arange(0, C)[None, :]
        return tl.load(kc + at, mask=live[:, None], other=0.0), tl.load(vcache + at, mask=live[:, None], other=0.0)

    @triton.jit
    def _attend(q, k, v, live, scale, bound, l_i, o):
        """One tile of keys and values into the running (sum of p, sum of p·v) of the query rows q (bf16)."""
        qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32))
        p = tl.where(live[None, :], tl.exp(qk * scale - bound), 0.0)
        return l_i + tl.sum(p, axis=1), _dot(p.to(tl.bfloat16), v, o)

    @triton.jit
    def _attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, idx_ptr, xn_ptr, gate_w_ptr, ve_ptr,
                          k_cache, v_cache, o_ptr, l_ptr, count_ptr, y_ptr, stride_cb, stride_cg, D, window,
                          chunk, n_split, eps, gain, scale, bound, H: tl.constexpr, KVH: tl.constexpr,
                          C: tl.constexpr, HAS_VE: tl.constexpr, VE_CH: tl.constexpr, BLOCK_J: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_VE: tl.constexpr, BLOCK_G: tl.constexpr,
                          ONE_TILE: tl.constexpr, BALANCED: tl.constexpr, PDL: tl.constexpr):
        """Program (b, g, s): the G query heads of kv group g of row b (rows of a (BLOCK_G >= 16, C) tile, the
        unused ones zero) over positions [s·chunk, (s+1)·chunk) of their window, with rotary + QK-norm of q and of
        the new k, and the gated value embedding of the new v, done here. Each K/V tile is read once per group and
        both products are tl.dots (bf16 operands, fp32 sums), which Triton pipelines: the next tiles load while
        this one multiplies. Scores q·k·scale as the model's SDPA (bf16 q and k, fp32 sums), the probabilities
        rounded to bf16 for P·V as flash attention does. Whole heads (C wide), not halves: two products a tile.

        The new key/value (position pos) come from registers, so no program reads the cache where one writes it;
        the split holding pos writes them. The last split of (b, g) to finish merges the splits into y[b, heads],
        its bf16 output. QK-norm bounds every score: |q|, |k| <= QK_GAIN·sqrt(C), so q·k·scale <= `bound`, and
        exp(score - bound) needs no running max (no rescaling of the accumulators).

        ONE_TILE (BLOCK_J >= chunk: few rows, short splits): the split's keys and values load before the PDL wait.
        They, and the row's position, were written by earlier steps, whose kernels have all finished by then: each
        kernel waits for its predecessor before it lets the next one launch. Only q (the previous kernel's output)
        and the new token wait.

        BALANCED (many rows): each row's window is cut into as many equal splits as the grid has (its third
        dimension), `chunk` unused: rows at any position give programs of equal work, where fixed `chunk`-long
        splits leave a short last one (position 640 in 512-long splits: 512 and 129 keys)."""
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        s = tl.program_id(2)
        G: tl.constexpr = H // KVH
        HALF: tl.constexpr = C // 2
        pos = tl.load(pos_ptr + b)
        lo = tl.maximum(pos - window, 0)
        if BALANCED:  # split s of the row's window [lo, pos]; first = 0
            span = tl.cdiv(pos + 1 - lo, tl.num_programs(2))
            base = lo
        else:  # split s of the positions [s·chunk, (s+1)·chunk)
            span = chunk
            base = lo * 0
        start = tl.maximum(base + s * span, lo)
        end = tl.minimum(base + s * span + span, pos + 1)
        stop = tl.minimum(end, pos)  # the cache holds positions < pos; pos itself comes from registers
        kc = k_cache + b * stride_cb + g * stride_cg
        vcache = v_cache + b * stride_cb + g * stride_cg
        if ONE_TILE:
            j = s * span + tl.arange(0, BLOCK_J)
            live = (j >= start) & (j < stop)
            k, v = _kv_tile(kc, vcache, j, live, C)
        _pdl_start(PDL)
        if start < end:
            cc = tl.arange(0, C)
            c, swap = cc[None, :], ((cc + HALF) % C)[None, :]
            r = tl.arange(0, BLOCK_G)
            heads = g * G + r
            in_group = (r < G)[:, None]
            row = qkv_ptr + b * ((H + 2 * KVH) * C)
            cos = tl.load(cos_ptr + pos * HALF + cc % HALF).to(tl.float32)
            sin = tl.load(sin_ptr + pos * HALF + cc % HALF).to(tl.float32) * tl.where(cc < HALF, 1.0, -1.0)
            q_at = row + heads[:, None] * C
            q = _rope_norm_heads(tl.load(q_at + c, mask=in_group, other=0.0).to(tl.float32),
                                 tl.load(q_at + swap, mask=in_group, other=0.0).to(tl.float32), cos, sin, eps, gain, C)
            qb = q.to(tl.bfloat16)  # exact: _rope_norm_heads rounds to bf16
            l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
            o = tl.zeros([BLOCK_G, C], dtype=tl.float32)
            if ONE_TILE:
                l_i, o = _attend(qb, k, v, live, scale, bound, l_i, o)
            else:
                for j0 in range(start, stop, BLOCK_J):
                    j = j0 + tl.arange(0, BLOCK_J)
                    live = j < stop
                    k, v = _kv_tile(kc, vcache, j, live, C)
                    l_i, o = _attend(qb, k, v, live, scale, bound, l_i, o)
            first, last = (lo - base) // span, (pos - base) // span
            if s == last:  # the new token: its key and value, then into the cache
                k_at = row + (H + g) * C
                kn = _rope_norm_heads(tl.load(k_at + c).to(tl.float32), tl.load(k_at + swap).to(tl.float32), cos, sin,
                                      eps, gain, C)
                vn = tl.load(row + (H + KVH + g) * C + c).to(tl.float32)
                if HAS_VE:  # ResFormer value embedding, gated per kv head
                    gate = _ve_gate(xn_ptr, gate_w_ptr, b, g, D, VE_CH, BLOCK_VE)
                    ve = tl.load(ve_ptr + tl.load(idx_ptr + b) * (KVH * C) + g * C + c).to(tl.float32)
                    vn = _bf(vn + _bf(gate * ve))
                p_new = tl.exp(tl.sum(kn * q, axis=1) * scale - bound)
                l_i += p_new
                o += p_new[:, None] * vn
                tl.store(kc + pos * C + c, kn.to(tl.bfloat16))
                tl.store(vcache + pos * C + c, vn.to(tl.bfloat16))
            y = y_ptr + b * (H * C) + heads[:, None] * C + c
            if first == last:  # one split: it is the output
                tl.store(y, (o / l_i[:, None]).to(tl.bfloat16), mask=in_group)
            else:
                # Partial sums under the shared bound: y = sum of the splits' o / sum of their l.
                part = (b * H + heads) * n_split
                tl.store(o_ptr + (part + s)[:, None] * C + c, o, mask=in_group)
                tl.store(l_ptr + part + s, l_i, mask=r < G)
                # acq_rel: the partials above are visible to the program that sees the last count
                if tl.atomic_add(count_ptr + b * KVH + g, 1) == last - first:
                    ss = tl.arange(0, BLOCK_S)
                    valid = (ss >= first) & (ss <= last)
                    for i in tl.static_range(G):
                        part_i = (b * H + g * G + i) * n_split
                        l_all = tl.sum(tl.load(l_ptr + part_i + ss, mask=valid, other=0.0, cache_modifier=".cg"),
                                       axis=0)
                        o_all = tl.load(o_ptr + (part_i + ss)[:, None] * C + c, mask=valid[:, None], other=0.0,
                                        cache_modifier=".cg")
                        y_i = y_ptr + b * (H * C) + (g * G + i) * C + cc
                        tl.store(y_i, (tl.sum(o_all, axis=0) / l_all).to(tl.bfloat16))
                    tl.atomic_xchg(count_ptr + b * KVH + g, 0)  # ready for the next launch

    @triton.jit
    def _pick_kernel(stats_ptr, n_blocks, topv_ptr, topi_ptr, state_ptr, fstate_ptr, out_ptr, lse_ptr,
                     n_state, max_pos, out_stride, K_MAX: tl.constexpr, BLOCK_NB: tl.constexpr, PDL: tl.constexpr):
        """Row b's token: the argmax (K_MAX 1) or a Gumbel-max draw among its top-k/top-p candidates (the
        K_MAX best logits, sorted), its log-prob, and the row's next inputs. state rows: token, pos, step,
        hashed seed, top_k, active; fstate rows: temperature, top_p."""
        _pdl_start(PDL)
        b = tl.program_id(0).to(tl.int64)
        nb = tl.arange(0, BLOCK_NB)
        nbm = nb < n_blocks
        at = (b * n_blocks + nb) * 3
        block_max = tl.load(stats_ptr + at, mask=nbm, other=-float("inf"))
        block_sum = tl.load(stats_ptr + at + 1, mask=nbm, other=0.0)
        top = tl.max(block_max, axis=0)
        lse = top + tl.log(tl.sum(block_sum * tl.exp(block_max - top), axis=0))
        step = tl.load(state_ptr + 2 * n_state + b)
        if K_MAX == 1:
            first = tl.argmax(block_max, axis=0)
            token = tl.sum(tl.where(nb == first, tl.load(stats_ptr + at + 2, mask=nbm, other=0.0), 0.0),
                           axis=0).to(tl.int64)
            chosen = top
        else:
            r = tl.arange(0, K_MAX)
            values = tl.load(topv_ptr + b * K_MAX + r)
            ids = tl.load(topi_ptr + b * K_MAX + r)
            z = values / tl.load(fstate_ptr + b)
            in_k = r < tl.load(state_ptr + 4 * n_state + b)
            z = tl.where(in_k, z, -float("inf"))
            e = tl.exp(z - tl.max(z, axis=0))
            p = e / tl.sum(e, axis=0)
            keep = in_k & (tl.cumsum(p, axis=0) - p < tl.load(fstate_ptr + n_state + b))
            key = _hash32(tl.load(state_ptr + 3 * n_state + b) ^ step)
            uniform = ((_hash32(key ^ r) >> 9).to(tl.float32) + 0.5) / 8388608.0
            noisy = tl.where(keep, z - tl.log(-tl.log(uniform)), -float("inf"))
            pick = r == tl.argmax(noisy, axis=0)
            token = tl.sum(tl.where(pick, ids, 0), axis=0)
            chosen = tl.sum(tl.where(pick, values, 0.0), axis=0)
        tl.store(out_ptr + b * out_stride, token.to(tl.float32))
        tl.store(out_ptr + b * out_stride + 1, chosen - lse)
        tl.store(lse_ptr + b, lse)
        active = tl.load(state_ptr + 5 * n_state + b)
        tl.store(state_ptr + b, token)
        tl.store(state_ptr + n_state + b, tl.minimum(tl.load(state_ptr + n_state + b) + active, max_pos))
        tl.store(state_ptr + 2 * n_state + b, step + active)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _gemv_blocks(N: int, K: int, tile: int = 8192) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the one-row GEMV: about 256 programs or more, tiles of `tile` weights (8192 was
    the fastest of 2048-8192 at d12's shapes, benchmarks/decode_kernels.py)."""
    block_n = min(32, max(4, 1 << max(N // 256, 1).bit_length() - 1))
    return block_n, min(_pow2(K), tile // block_n)


NARROW = 16  # up to this many rows a step runs on the Triton GEMV/skinny GEMM; wider ones on cuBLAS


class FusedDecoder:
    """The decode step of a prepared (bf16) GPT on its engine's KV cache and slot state (module docstring)."""

    # The attention's (BLOCK_J, pipeline stages, warps); None: the fastest measured (H200, d20, benchmarks/RESULTS.md):
    # (64, 3, 4) up to NARROW rows (6.3 us a layer at 1 row, 8 warps 6.6), (64, 3, 8) above (114 us at 128 rows)
    attention_tiles: tuple[int, int, int] | None = None
    # Above NARROW rows: each row's window in this many equal splits (the kernel's BALANCED); None: `chunk`-long ones
    attention_splits: int | None = None
    wide_chunk = 512  # positions per attention split from 64 rows up (`chunk`)
    wide_attention_tiles = (64, 3, 8)  # the attention's tiles above NARROW rows, where attention_tiles is None
    narrow_rows = NARROW  # steps of up to this many rows run every GEMM in _linear_kernel, wider ones on cuBLAS
    gemm_tiles = (16, 32, 128, 4, 3)  # _linear_kernel's (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) above one row
    # the one-row GEMV's measured (BLOCK_N, BLOCK_K, warps) by weight shape (N, K); others by _gemv_blocks.
    # Assigned whole, never mutated (a class default shared by every instance)
    gemv_tuned: dict[tuple[int, int], tuple[int, int, int]] = {}

    def __init__(self, model, cache, state: torch.Tensor, fstate: torch.Tensor):
        """state (6, slots) int64: token, pos, step, hashed seed, top_k, active; fstate (2, slots) fp32:
        temperature, top_p. The step reads its inputs there and writes the next ones."""
        cfg = model.config
        self.L, self.D, self.H, self.KVH, self.C = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.V, self.seq_len = cfg.vocab_size, cfg.seq_len
        if self.H % self.KVH or self.C % 2 or self.C != _pow2(self.C):
            raise ValueError(f"fused decode needs n_head % n_kv_head == 0 and a power-of-two head_dim, got {cfg}")
        self.cache, self.state, self.fstate = cache, state, fstate
        # Programmatic dependent launch: each kernel starts while the previous one finishes (module docstring)
        self.pdl = torch.cuda.get_device_capability(state.device) >= (9, 0) and not _INTERPRET
        self.eps = kernels.norm_eps(torch.bfloat16)
        # |q|, |k| <= QK_GAIN·sqrt(C) after QK-norm (bf16 rounding: 1% margin), so every score is <= this
        self.bound = QK_GAIN ** 2 * math.sqrt(self.C) * 1.01
        self.layers = []
        for i, block in enumerate(model.blocks):
            attn = block.attn
            ve = model.value_embeds[str(i)].weight if str(i) in model.value_embeds else None
            self.layers.append(dict(qkv=attn.w_qkv, o=attn.c_proj.weight, fc=block.mlp.c_fc.weight,
                                    proj=block.mlp.c_proj.weight, ve=ve, window=min(attn.window, self.seq_len),
                                    gate=None if ve is None else attn.ve_gate.weight.contiguous()))
        self.lam = torch.stack([model.resid_lambdas, model.x0_lambdas], dim=1).float().contiguous()
        self.no_mix = torch.tensor([1.0, 0.0], device=state.device)  # mix_norm as a plain RMSNorm
        self.wte, self.lm_head = model.wte.weight, model.lm_head.weight
        self.smear_w = model.smear_gate.weight.reshape(-1).contiguous()
        self.smear_lam = model.smear_lambda.detach().to(torch.bfloat16)
        self.backout_lam = model.backout_lambda.detach().to(torch.bfloat16)
        self.cos = model.cos[0, :self.seq_len, 0].to(torch.bfloat16).contiguous()
        self.sin = model.sin[0, :self.seq_len, 0].to(torch.bfloat16).contiguous()
        n, dev, bf = state.size(1), state.device, torch.bfloat16
        D, HC = self.D, self.H * self.C
        self.x, self.x0, self.xn, self.backout = (torch.zeros(n, D, device=dev, dtype=bf) for _ in range(4))
        self.qkv = torch.zeros(n, (self.H + 2 * self.KVH) * self.C, device=dev, dtype=bf)
        self.y = torch.zeros(n, HC, device=dev, dtype=bf)
        self.h = torch.zeros(n, 4 * D, device=dev, dtype=bf)
        self.o = torch.zeros(n, self.H, MAX_SPLITS, self.C, device=dev)
        self.l = torch.zeros(n, self.H, MAX_SPLITS, device=dev)
        # splits done per (row, kv group), at b·KVH + g; the last split resets its own
        self.count = torch.zeros(n, self.KVH, dtype=torch.int32, device=dev)
        self.logits = torch.zeros(n, self.V, device=dev)
        self.logits_bf = torch.zeros(n, self.V, device=dev, dtype=bf)
        self.lm_blocks = (32, 256)  # 1024 programs over a 32k vocabulary
        self.stats = torch.zeros(n, triton.cdiv(self.V, 32), 3, device=dev)
        self.n_blocks = 0  # column blocks of the last lm_head (its stats' row length)
        self.row_lse = torch.zeros(n, device=dev)

    def _gemv_tiles(self, N: int, K: int, EPI: int) -> tuple[int, int, int]:
        """(BLOCK_N, BLOCK_K, warps) of the one-row GEMV of an (N, K) weight: measured picks (`gemv_tuned`) first."""
        tuned = self.gemv_tuned.get((N, K))
        if tuned and (EPI != 3 or tuned[0] >= 32):  # the lm_head's sampler stats hold V / 32 blocks a row
            return tuned
        block_n, block_k = self.lm_blocks if EPI == 3 else _gemv_blocks(N, K)
        return block_n, block_k, 8 if block_k >= 2048 else 4

    def _linear(self, x, w, out, B, PRO=0, EPI=0, MIX=False, SAVE=False, STORE_XN=False, layer=None,
                tiles=None) -> int:
        """One _linear_kernel launch over B rows; returns its number of column blocks."""
        N, K = w.shape[0] if EPI != 3 else self.V, w.shape[1]
        if B == 1:
            (block_n, block_k, warps), block_m, stages = tiles or self._gemv_tiles(N, K, EPI), 1, 3
        else:
            block_m, block_n, block_k, warps, stages = tiles or self.gemm_tiles
        lam = self.lam[layer + 1] if MIX else self.lam
        grid = (triton.cdiv(N, block_n), triton.cdiv(B, block_m))
        _linear_kernel[grid](x, w, out, B, N, K, out, self.x0, lam, self.backout, self.backout, self.backout_lam,
                             self.xn, self.stats, self.eps, SOFTCAP, PRO=PRO, EPI=EPI, MIX=MIX, SAVE=SAVE,
                             STORE_XN=STORE_XN, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PDL=self.pdl,
                             num_warps=warps, num_stages=stages, launch_pdl=self.pdl)
        return grid[0]

    def chunk(self, B: int) -> int:
        """Positions per attention split: short splits for few rows (more programs), long ones for many. H200,
        d20 at position 640 (decode_kernels.py): 1 row 6.3 us at 64 (6.4 at 128); 128 rows 113-114 us at 512,
        120-127 at 256."""
        target = 64 if B <= NARROW else 256 if B < 64 else self.wide_chunk
        return max(target, triton.cdiv(self.seq_len, MAX_SPLITS))

    def _attention(self, B: int, i: int) -> None:
        """Layer i's attention of B rows: its bf16 output into y; the new keys and values into the cache."""
        layer, chunk = self.layers[i], self.chunk(B)
        has_ve = layer["ve"] is not None
        k, v = self.cache.k[i], self.cache.v[i]
        args = (self.qkv, self.cos, self.sin, self.state[1], self.state[0], self.xn,
                layer["gate"] if has_ve else self.xn, layer["ve"] if has_ve else self.xn, k, v, self.o, self.l,
                self.count, self.y, k.stride(0), k.stride(1), self.D, layer["window"], chunk, MAX_SPLITS, self.eps,
                QK_GAIN, 1 / math.sqrt(self.C), self.bound)
        balanced = self.attention_splits is not None and B > NARROW
        n_split = self.attention_splits if balanced else triton.cdiv(self.seq_len, chunk)
        if not 1 <= n_split <= MAX_SPLITS:
            raise ValueError(f"attention_splits: 1 to {MAX_SPLITS} (or None), got {self.attention_splits}")
        block_j, stages, warps = self.attention_tiles or ((64, 3, 4) if B <= NARROW else self.wide_attention_tiles)
        _attention_kernel[(B, self.KVH, n_split)](*args, H=self.H, KVH=self.KVH, C=self.C, HAS_VE=has_ve,
                                                  VE_CH=VE_GATE_CHANNELS, BLOCK_J=block_j, BLOCK_S=_pow2(n_split),
                                                  BLOCK_VE=_pow2(VE_GATE_CHANNELS),
                                                  BLOCK_G=max(16, _pow2(self.H // self.KVH)),
                                                  ONE_TILE=not balanced and block_j >= chunk, BALANCED=balanced,
                                                  PDL=self.pdl, num_stages=stages, num_warps=warps,
                                                  launch_pdl=self.pdl)

    def _mix_norm(self, B: int, lam: torch.Tensor) -> None:
        """x = lam[0]·x + lam[1]·x0 in place and xn = RMSNorm(x): nanoray.kernels' mix_norm kernel."""
        kernels._mix_norm_fwd_kernel[(B,)](self.x, self.x0, lam, self.x, self.xn, self.D, self.eps,
                                           BLOCK=_pow2(self.D), num_warps=4)

    def forward(self, B: int) -> torch.Tensor:
        """Logits (B, V) fp32 of the slots' current tokens at their positions; writes the cache in place.
        Also leaves each lm_head block's (max, sum-exp, argmax) per row in `stats`, for `sample`."""
        _embed_kernel[(B,)](self.state[0], self.wte, self.smear_w, self.smear_lam, self.cache.prev_emb, self.x0,
                            self.x, self.lam[0], self.D, self.eps, SMEAR=SMEAR_CHANNELS, BLOCK_D=_pow2(self.D),
                            BLOCK_SM=_pow2(SMEAR_CHANNELS), PDL=self.pdl, num_warps=4, launch_pdl=self.pdl)
        if B <= self.narrow_rows:
            self._narrow(B)
        else:
            self._wide(B)
        return self.logits[:B]

    def _narrow(self, B: int) -> None:
        """Few rows: 5 kernels a layer, norms, residuals, mixes and ReLU² inside the GEMVs."""
        L = self.L
        for i, layer in enumerate(self.layers):
            self._linear(self.x, layer["qkv"], self.qkv, B, PRO=1, STORE_XN=layer["ve"] is not None)
            self._attention(B, i)
            self._linear(self.y, layer["o"], self.x, B, EPI=2)
            self._linear(self.x, layer["fc"], self.h, B, PRO=1, EPI=1)
            self._linear(self.h, layer["proj"], self.x, B, EPI=2, MIX=i + 1 < L, SAVE=i == L // 2, layer=i)
        self.n_blocks = self._linear(self.x, self.lm_head, self.logits, B, PRO=2, EPI=3)

    def _wide(self, B: int) -> None:
        """Many rows: cuBLAS GEMMs (their rounding: one per output, the residual added inside), with the norms,
        mixes, ReLU² and attention as kernels of their own; 8 kernels a layer."""
        x, xn, h, qkv, y = self.x[:B], self.xn[:B], self.h[:B], self.qkv[:B], self.y[:B]
        for i, layer in enumerate(self.layers):
            self._mix_norm(B, self.lam[i] if i else self.no_mix)  # layer 0's mix came with the embedding
            torch.mm(xn, layer["qkv"].t(), out=qkv)
            self._attention(B, i)
            x.addmm_(y, layer["o"].t())
            self._mix_norm(B, self.no_mix)
            torch.mm(xn, layer["fc"].t(), out=h)
            _relu2_kernel[(triton.cdiv(h.numel(), 4096),)](h, h.numel(), BLOCK=4096, num_warps=8)
            x.addmm_(h, layer["proj"].t())
            if i == self.L // 2:
                self.backout[:B].copy_(x)
        x.sub_(self.backout[:B] * self.backout_lam)
        self._mix_norm(B, self.no_mix)
        torch.mm(xn, self.lm_head[:self.V].t(), out=self.logits_bf[:B])
        self.n_blocks = triton.cdiv(self.V, 32)
        grid = (triton.cdiv(self.n_blocks, 64), B)
        _softcap_kernel[grid](self.logits_bf, self.V, self.logits, self.stats, self.V, self.n_blocks, SOFTCAP,
                              BLOCK_N=32, NB=64, num_warps=4)

    def sample(self, B: int, k_max: int, out: torch.Tensor) -> None:
        """After forward: each row's token and log-prob into out (B, >= 2) fp32; the next inputs into state."""
        n_blocks = self.n_blocks
        if k_max > 1:
            values, ids = self.logits[:B].topk(k_max, dim=-1)
        else:
            values = ids = self.logits
        _pick_kernel[(B,)](self.stats, n_blocks, values, ids, self.state, self.fstate, out, self.row_lse,
                           self.state.size(1), self.seq_len - 1, out.stride(0), K_MAX=k_max,
                           BLOCK_NB=_pow2(n_blocks), PDL=self.pdl, num_warps=4, launch_pdl=self.pdl)
