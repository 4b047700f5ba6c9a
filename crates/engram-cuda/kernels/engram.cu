// Engram layer kernels (the demo variant), compiled at run time by NVRTC straight to a
// CUBIN for the device's architecture. Header-free: bf16 is handled by bit operations, so
// NVRTC needs no include path.
//
// Notation as in shared/notes/reference-semantics.md: B sequences of L tokens (T = B*L rows),
// HC = hc_mult branches, D = hidden_size, N = max_ngram_size, K = n_head_per_ngram,
// H = (N-1)*K heads, d = row width of the table, Dm = H*d, W = (HC+1)*D (the projection's
// output: value first, then the HC keys), KC = kernel_size, R = (KC-1)*N carried conv rows.
//
// Streaming state lives on the device, one slot per sequence b:
//   pos[b]              tokens consumed before this chunk;
//   ngram_ring[b][N-1]  canonical ids of the last N-1 tokens, slot (position mod (N-1));
//   conv_ring[b][R][HC*D]  normalised conv inputs of the last R tokens, slot (position mod R),
//                       always f32 (a fresh state: pad ids, zero rows = the reference's
//                       implicit left padding).
// A chunk reads positions before its start from the rings, so a chunked run equals one shot.
//
// Activations (`act_t`) are f32 or bf16 per instantiation; every reduction accumulates in f32.

typedef unsigned short bf16_t;
typedef long long i64;
typedef unsigned long long u64;

// ---------------------------------------------------------------- element conversion

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((unsigned)x) << 16); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16_t* p, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        *p = (bf16_t)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    *p = (bf16_t)(u >> 16);
}

// Eight consecutive elements with 16-byte loads (p must be 16-byte aligned).
__device__ __forceinline__ void load8(const float* p, float v[8]) {
    float4 a = *reinterpret_cast<const float4*>(p);
    float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16_t* p, float v[8]) {
    uint4 a = *reinterpret_cast<const uint4*>(p);
    unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void store8(float* p, const float v[8]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16_t* p, const float v[8]) {
    bf16_t h[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) store(&h[i], v[i]);
    uint4 a;
    a.x = h[0] | ((unsigned)h[1] << 16);
    a.y = h[2] | ((unsigned)h[3] << 16);
    a.z = h[4] | ((unsigned)h[5] << 16);
    a.w = h[6] | ((unsigned)h[7] << 16);
    *reinterpret_cast<uint4*>(p) = a;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ i64 floor_mod(i64 a, i64 m) {
    i64 r = a % m;
    return r < 0 ? r + m : r;
}

// ---------------------------------------------------------------- §1-4: hash + gather

// Canonical id of token `tt` (relative to the chunk start) of sequence b: from the chunk
// (compressed through `lookup`; negative raw ids pass through, §1) or, before the chunk,
// from the n-gram ring. An id >= V sets *err (the host checks ids before the launch).
__device__ __forceinline__ i64 canonical(const i64* __restrict__ ids, const i64* __restrict__ lookup,
                                         i64 vocab, const i64* __restrict__ ngram_ring,
                                         i64 pos, int b, int L, int hist, int tt, int* err) {
    if (tt >= 0) {
        i64 id = ids[(i64)b * L + tt];
        if (id < 0) return id;
        if (id >= vocab) {
            if (err) atomicExch(err, 1);
            return 0;
        }
        return lookup[id];
    }
    i64 slot = floor_mod(pos + tt, hist);
    return ngram_ring[(i64)b * hist + slot];
}

#define HASH_TOKENS 4  // tokens per block of hash_gather

// One block per HASH_TOKENS tokens. Phase 1: one thread per (token, head) hashes (§3) and
// turns the hash into a table row (§4: + offset). Phase 2: the block copies the rows with
// 16-byte loads into emb[T][H*d].
template <typename table_t>
__device__ void hash_gather(const i64* __restrict__ ids, const i64* __restrict__ lookup, i64 vocab,
                            const i64* __restrict__ mult, const i64* __restrict__ primes,
                            const i64* __restrict__ offsets, const i64* __restrict__ ngram_ring,
                            const i64* __restrict__ pos, int B, int L, int N, int K, int d,
                            const table_t* __restrict__ table, table_t* __restrict__ emb,
                            i64* __restrict__ hash_out, int* err) {
    extern __shared__ i64 rows[];  // [HASH_TOKENS][H]
    const int H = (N - 1) * K;
    const i64 T = (i64)B * L;
    const i64 first = (i64)blockIdx.x * HASH_TOKENS;
    const int ntok = (int)min((i64)HASH_TOKENS, T - first);
    for (int idx = threadIdx.x; idx < ntok * H; idx += blockDim.x) {
        const int tok = idx / H, h = idx % H;
        const i64 g = first + tok;
        const int b = (int)(g / L), t = (int)(g % L);
        const int n = h / K + 2;  // n-gram order of head h
        const i64 p0 = pos[b];
        i64 mix = 0;
        for (int k = 0; k < n; ++k) {
            const i64 c = canonical(ids, lookup, vocab, ngram_ring, p0, b, L, N - 1, t - k, err);
            // int64 products wrap as in the reference's int64 arithmetic.
            mix ^= (i64)((u64)c * (u64)mult[k]);
        }
        const i64 hash = floor_mod(mix, primes[h]);
        rows[tok * H + h] = hash + offsets[h];
        if (hash_out) hash_out[g * H + h] = hash;
    }
    __syncthreads();
    const int chunks = d * (int)sizeof(table_t) / 16;  // 16-byte pieces of one row
    for (int idx = threadIdx.x; idx < ntok * H * chunks; idx += blockDim.x) {
        const int c = idx % chunks, th = idx / chunks;  // th = tok * H + h
        const uint4* src = reinterpret_cast<const uint4*>(table + rows[th] * d);
        uint4* dst = reinterpret_cast<uint4*>(emb + ((first * H) + th) * d);
        dst[c] = src[c];
    }
}

// ---------------------------------------------------------------- §5: gates

// grid (rows, ceil(HC/4)), 128 threads: warp w of block (x, y) is branch i = 4y + w of token
// row t = row0 + x.
// Writes gates[t][i] and cscale[t][i] = 1/sqrt(mean(gated^2) + eps_conv), the short conv's
// RMSNorm factor of that branch's gated value (§6), so that the conv kernel can rebuild any
// normalised row from the value alone.
template <typename act_t>
__device__ void gate(const act_t* __restrict__ kv, const act_t* __restrict__ hidden,
                     const float* __restrict__ bias, const float* __restrict__ norm1,
                     const float* __restrict__ norm2, float* __restrict__ gates,
                     float* __restrict__ cscale, i64 row0, int HC, int D, float eps,
                     float eps_conv) {
    const int lane = threadIdx.x & 31;
    const int i = blockIdx.y * 4 + (threadIdx.x >> 5);
    if (i >= HC) return;
    const i64 t = row0 + blockIdx.x;
    const i64 W = (i64)(HC + 1) * D;
    const act_t* key = kv + t * W + (i64)(i + 1) * D;
    const act_t* value = kv + t * W;
    const act_t* q = hidden + (t * HC + i) * D;
    const float* bk = bias + (i64)(i + 1) * D;
    const float* w1 = norm1 + (i64)i * D;
    const float* w2 = norm2 + (i64)i * D;
    float kk = 0.f, qq = 0.f;
    for (int j = lane * 8; j < D; j += 256) {
        float kv8[8], q8[8], b8[8];
        load8(key + j, kv8);
        load8(q + j, q8);
        load8(bk + j, b8);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float k = kv8[e] + b8[e];
            kk += k * k;
            qq += q8[e] * q8[e];
        }
    }
    const float rk = 1.0f / sqrtf(warp_sum(kk) / D + eps);
    const float rq = 1.0f / sqrtf(warp_sum(qq) / D + eps);
    float dot = 0.f;
    for (int j = lane * 8; j < D; j += 256) {
        float kv8[8], q8[8], b8[8], a8[8], c8[8];
        load8(key + j, kv8);
        load8(q + j, q8);
        load8(bk + j, b8);
        load8(w1 + j, a8);
        load8(w2 + j, c8);
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += ((kv8[e] + b8[e]) * rk * a8[e]) * (q8[e] * rq * c8[e]);
    }
    const float s = warp_sum(dot) / sqrtf((float)D);
    const float sg = s > 0.f ? 1.f : (s < 0.f ? -1.f : 0.f);
    const float s2 = sqrtf(fmaxf(fabsf(s), 1e-6f)) * sg;
    const float g = 1.0f / (1.0f + expf(-s2));
    float vv = 0.f;
    for (int j = lane * 8; j < D; j += 256) {
        float v8[8], b8[8];
        load8(value + j, v8);
        load8(bias + j, b8);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float x = g * (v8[e] + b8[e]);
            vv += x * x;
        }
    }
    const float cs = 1.0f / sqrtf(warp_sum(vv) / D + eps_conv);
    if (lane == 0) {
        gates[t * HC + i] = g;
        cscale[t * HC + i] = cs;
    }
}

// ---------------------------------------------------------------- §6: conv + output

// The short conv's normalised input of token row `g`, branch i, channels j..j+8:
// RMSNorm(gate * value) = gated * cscale * w (§6), from the value row alone.
template <typename act_t>
__device__ __forceinline__ void normed8(const act_t* __restrict__ kv, const float* __restrict__ bias,
                                        const float* __restrict__ gates,
                                        const float* __restrict__ cscale,
                                        const float* __restrict__ cnorm, i64 g, int i, int j,
                                        int HC, int D, float out[8]) {
    float v8[8], b8[8], w8[8];
    load8(kv + g * (i64)(HC + 1) * D + j, v8);
    load8(bias + j, b8);
    load8(cnorm + (i64)i * D + j, w8);
    const float gt = gates[g * HC + i], cs = cscale[g * HC + i];
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = gt * (v8[e] + b8[e]) * cs * w8[e];
}

// One thread per 8 channels of one (token row in row0..row0+rows, branch): the dilated
// causal depthwise conv over the normalised rows t - (KC-1-k)*N (from the chunk or the conv ring), SiLU, plus the gated
// value. Optionally keeps gated_value and short_conv (f32) for the stage-by-stage check.
template <typename act_t>
__device__ void conv_out(const act_t* __restrict__ kv, const float* __restrict__ bias,
                         const float* __restrict__ gates, const float* __restrict__ cscale,
                         const float* __restrict__ cnorm, const float* __restrict__ conv_w,
                         const float* __restrict__ conv_ring, const i64* __restrict__ pos,
                         act_t* __restrict__ out, float* __restrict__ gated_out,
                         float* __restrict__ conv_out_f, i64 row0, i64 rows, int L, int HC,
                         int D, int KC, int N) {
    const i64 C = (i64)HC * D;
    const i64 total = rows * C / 8;
    const int R = (KC - 1) * N;
    for (i64 piece = (i64)blockIdx.x * blockDim.x + threadIdx.x; piece < total;
         piece += (i64)gridDim.x * blockDim.x) {
        const i64 idx = row0 * C / 8 + piece;
        const i64 g = idx * 8 / C;                  // token row
        const int c = (int)(idx * 8 - g * C);        // channel i*D + j
        const int i = c / D, j = c - i * D;
        const int b = (int)(g / L), t = (int)(g - (i64)b * L);
        float y[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = 0.f;
        for (int k = 0; k < KC; ++k) {
            const int tt = t - (KC - 1 - k) * N;
            float n8[8], w[8];
            if (tt >= 0) {
                normed8(kv, bias, gates, cscale, cnorm, g - (t - tt), i, j, HC, D, n8);
            } else {
                const i64 slot = floor_mod(pos[b] + tt, R);
                load8(conv_ring + ((i64)b * R + slot) * C + c, n8);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) w[e] = conv_w[(c + e) * (i64)KC + k];
#pragma unroll
            for (int e = 0; e < 8; ++e) y[e] += w[e] * n8[e];
        }
        float v8[8], b8[8], o[8], gv[8], sc[8];
        load8(kv + g * (i64)(HC + 1) * D + j, v8);
        load8(bias + j, b8);
        const float gt = gates[g * HC + i];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            gv[e] = gt * (v8[e] + b8[e]);
            sc[e] = y[e] / (1.0f + expf(-y[e]));  // SiLU
            o[e] = gv[e] + sc[e];
        }
        store8(out + g * C + c, o);
        if (gated_out) store8(gated_out + g * C + c, gv);
        if (conv_out_f) store8(conv_out_f + g * C + c, sc);
    }
}

// `conv_out` laid out for coalescing (measured on the H200, 2026-11-28, `conv_out` took 77% of
// a bf16 prefill: each thread read its 8 channels' taps as 32 scalar loads 4·KC bytes apart).
// One block per token row g = row0 + blockIdx.x, threads over 8-channel pieces; the conv
// weight comes tap-major (`conv_wt` [KC][HC·D], so a warp's tap load is 1 KB contiguous);
// the bias and conv norm weight are loaded once per piece. Same arithmetic in the same order
// as `conv_out`: the outputs are meant to be bit-identical.
template <typename act_t>
__device__ void conv_rows(const act_t* __restrict__ kv, const float* __restrict__ bias,
                          const float* __restrict__ gates, const float* __restrict__ cscale,
                          const float* __restrict__ cnorm, const float* __restrict__ conv_wt,
                          const float* __restrict__ conv_ring, const i64* __restrict__ pos,
                          act_t* __restrict__ out, float* __restrict__ gated_out,
                          float* __restrict__ conv_out_f, i64 row0, int L, int HC, int D, int KC,
                          int N) {
    const int C = HC * D;
    const i64 W = (i64)(HC + 1) * D;
    const i64 g = row0 + blockIdx.x;
    const int b = (int)(g / L);
    const int t = (int)(g - (i64)b * L);
    const int R = (KC - 1) * N;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        const int i = c / D, j = c - i * D;
        float b8[8], w8[8], y[8];
        load8(bias + j, b8);
        load8(cnorm + c, w8);  // conv norm weights [HC][D]: branch i, channel j
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = 0.f;
        for (int k = 0; k < KC; ++k) {
            const int tt = t - (KC - 1 - k) * N;
            float n8[8], cw[8];
            load8(conv_wt + (i64)k * C + c, cw);
            if (tt >= 0) {
                const i64 gg = g - (t - tt);
                float v8[8];
                load8(kv + gg * W + j, v8);
                const float gt = gates[gg * HC + i], cs = cscale[gg * HC + i];
#pragma unroll
                for (int e = 0; e < 8; ++e) n8[e] = gt * (v8[e] + b8[e]) * cs * w8[e];
            } else {
                const i64 slot = floor_mod(pos[b] + tt, R);
                load8(conv_ring + ((i64)b * R + slot) * C + c, n8);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) y[e] += cw[e] * n8[e];
        }
        float v8[8], o[8], gv[8], sc[8];
        load8(kv + g * W + j, v8);
        const float gt = gates[g * HC + i];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            gv[e] = gt * (v8[e] + b8[e]);
            sc[e] = y[e] / (1.0f + expf(-y[e]));  // SiLU
            o[e] = gv[e] + sc[e];
        }
        store8(out + g * C + c, o);
        if (gated_out) store8(gated_out + g * C + c, gv);
        if (conv_out_f) store8(conv_out_f + g * C + c, sc);
    }
}

// One block per sequence: the rows of the chunk's last min(L, R) tokens go into the conv
// ring, its last min(L, N-1) canonical ids into the n-gram ring, then pos[b] += L. Runs
// after every kernel that reads the rings.
template <typename act_t>
__device__ void advance_state(const i64* __restrict__ ids, const i64* __restrict__ lookup,
                              i64 vocab, const act_t* __restrict__ kv,
                              const float* __restrict__ bias, const float* __restrict__ gates,
                              const float* __restrict__ cscale, const float* __restrict__ cnorm,
                              i64* __restrict__ ngram_ring, float* __restrict__ conv_ring,
                              i64* __restrict__ pos, int L, int HC, int D, int KC, int N) {
    const int b = blockIdx.x;
    const i64 p0 = pos[b];
    const int R = (KC - 1) * N, hist = N - 1;
    const i64 C = (i64)HC * D;
    const int first = L > R ? L - R : 0;
    const i64 pieces = (i64)(L - first) * C / 8;
    for (i64 idx = threadIdx.x; idx < pieces; idx += blockDim.x) {
        const int tt = first + (int)(idx * 8 / C);
        const int c = (int)(idx * 8 - (i64)(tt - first) * C);
        const int i = c / D, j = c - i * D;
        float n8[8];
        normed8(kv, bias, gates, cscale, cnorm, (i64)b * L + tt, i, j, HC, D, n8);
        store8(conv_ring + ((i64)b * R + floor_mod(p0 + tt, R)) * C + c, n8);
    }
    for (int r = threadIdx.x; r < hist; r += blockDim.x) {
        const int tt = L - hist + r;
        if (tt >= 0)
            ngram_ring[(i64)b * hist + floor_mod(p0 + tt, hist)] =
                canonical(ids, lookup, vocab, ngram_ring, p0, b, L, hist, tt, nullptr);
    }
    __syncthreads();
    if (threadIdx.x == 0) pos[b] = p0 + L;
}

// ---------------------------------------------------------------- entry points

#define HASH_GATHER(name, table_t)                                                          \
    extern "C" __global__ void __launch_bounds__(128) name(                                 \
        const i64* ids, const i64* lookup, i64 vocab, const i64* mult, const i64* primes,   \
        const i64* offsets, const i64* ngram_ring, const i64* pos, int B, int L, int N,     \
        int K, int d, const table_t* table, table_t* emb, i64* hash_out, int* err) {        \
        hash_gather<table_t>(ids, lookup, vocab, mult, primes, offsets, ngram_ring, pos, B, \
                             L, N, K, d, table, emb, hash_out, err);                        \
    }
HASH_GATHER(hash_gather_f32, float)
HASH_GATHER(hash_gather_bf16, bf16_t)

#define GATE(name, act_t)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) name(                                 \
        const act_t* kv, const act_t* hidden, const float* bias, const float* norm1,        \
        const float* norm2, float* gates, float* cscale, i64 row0, int HC, int D, float eps, \
        float eps_conv) {                                                                   \
        gate<act_t>(kv, hidden, bias, norm1, norm2, gates, cscale, row0, HC, D, eps,         \
                    eps_conv);                                                              \
    }
GATE(gate_f32, float)
GATE(gate_bf16, bf16_t)

#define CONV_OUT(name, act_t)                                                               \
    extern "C" __global__ void __launch_bounds__(256) name(                                 \
        const act_t* kv, const float* bias, const float* gates, const float* cscale,        \
        const float* cnorm, const float* conv_w, const float* conv_ring, const i64* pos,    \
        act_t* out, float* gated_out, float* conv_out_f, i64 row0, i64 rows, int B, int L,  \
        int HC, int D, int KC, int N) {                                                     \
        conv_out<act_t>(kv, bias, gates, cscale, cnorm, conv_w, conv_ring, pos, out,        \
                        gated_out, conv_out_f, row0, rows, L, HC, D, KC, N);                \
    }
CONV_OUT(conv_out_f32, float)
CONV_OUT(conv_out_bf16, bf16_t)

#define CONV_ROWS(name, act_t)                                                              \
    extern "C" __global__ void __launch_bounds__(256) name(                                 \
        const act_t* kv, const float* bias, const float* gates, const float* cscale,        \
        const float* cnorm, const float* conv_wt, const float* conv_ring, const i64* pos,   \
        act_t* out, float* gated_out, float* conv_out_f, i64 row0, int L, int HC, int D,    \
        int KC, int N) {                                                                    \
        conv_rows<act_t>(kv, bias, gates, cscale, cnorm, conv_wt, conv_ring, pos, out,      \
                         gated_out, conv_out_f, row0, L, HC, D, KC, N);                     \
    }
CONV_ROWS(conv_rows_f32, float)
CONV_ROWS(conv_rows_bf16, bf16_t)

#define ADVANCE(name, act_t)                                                                \
    extern "C" __global__ void __launch_bounds__(256) name(                                 \
        const i64* ids, const i64* lookup, i64 vocab, const act_t* kv, const float* bias,   \
        const float* gates, const float* cscale, const float* cnorm, i64* ngram_ring,       \
        float* conv_ring, i64* pos, int L, int HC, int D, int KC, int N) {                  \
        advance_state<act_t>(ids, lookup, vocab, kv, bias, gates, cscale, cnorm, ngram_ring, \
                             conv_ring, pos, L, HC, D, KC, N);                              \
    }
ADVANCE(advance_state_f32, float)
ADVANCE(advance_state_bf16, bf16_t)
