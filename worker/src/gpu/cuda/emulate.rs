//! The CUDA kernels (`kernels.cu`, unchanged) run on the host against the
//! f64 references, with the launch parameters `gpu::launch` gives them:
//! what CI checks of the kernels themselves without a GPU. build.rs
//! compiles them with the C++ compiler over `emulate.h`, where each CUDA
//! thread is an OS thread, `__syncthreads` a barrier of its block and a
//! warp shuffle an exchange between the warp's 32 threads; blocks run one
//! at a time. Shapes are small: a few thousand threads per launch.
//! `aquila gpu-check` runs the same comparisons on a real GPU, larger.

use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::check::{random, to_f32};
use super::ops::Elem;
use crate::config::RopeStyle;
use crate::gpu::launch::{self, Launch, attention_plan};
use crate::gpu::reference::{self, PagedCase, columns, max_rel_error};

#[repr(C)]
#[derive(Clone, Copy)]
struct Dim3 {
    x: u32,
    y: u32,
    z: u32,
}

fn grid(l: Launch) -> (Dim3, u32) {
    let (x, y, z) = l.grid;
    (Dim3 { x, y, z }, l.block)
}

/// The kernels of one element type T, as `emulate.cpp` exports them
/// (`emu_NAME_SUFFIX`): the grid and block, then the kernel's arguments.
#[rustfmt::skip]
struct Kernels<T> {
    embedding: unsafe extern "C" fn(Dim3, u32, *const u32, *const T, u32, u32, i32, *mut f32),
    rms_norm: unsafe extern "C" fn(Dim3, u32, *mut f32, *const f32, *const u32, *const T, f32, i32, *mut T),
    rope_kv_write: unsafe extern "C" fn(Dim3, u32, *mut f32, *const u32, *const f32, *const f32, *const u32,
        i32, i32, i32, i32, i32, *mut T, *mut T),
    attention: unsafe extern "C" fn(Dim3, u32, *const f32, *const T, *const T, *const u32, *const u32, *const u32,
        i32, i32, i32, i32, i32, i32, i32, i32, f32, *mut f32, *mut f32, *mut f32, *mut T),
    attention_merge: unsafe extern "C" fn(Dim3, u32, *const f32, *const f32, *const f32, *const u32,
        i32, i32, i32, i32, *mut T),
    attention_prefill: unsafe extern "C" fn(Dim3, u32, *const f32, i32, *const T, *const T, *const u32,
        *const u32, *const u32, i32, *const u32, i32, i32, i32, i32, f32, *mut T),
    silu_mul: unsafe extern "C" fn(Dim3, u32, *const f32, i32, usize, *mut T),
    fill_random: unsafe extern "C" fn(Dim3, u32, *mut T, usize, u64, f32, f32),
}

macro_rules! kernels {
    ($name:ident: $t:ty = $embedding:ident, $rms_norm:ident, $rope_kv_write:ident, $attention:ident,
     $attention_merge:ident, $attention_prefill:ident, $silu_mul:ident, $fill_random:ident) => {
        unsafe extern "C" {
            fn $embedding(
                _: Dim3,
                _: u32,
                _: *const u32,
                _: *const $t,
                _: u32,
                _: u32,
                _: i32,
                _: *mut f32,
            );
            fn $rms_norm(
                _: Dim3,
                _: u32,
                _: *mut f32,
                _: *const f32,
                _: *const u32,
                _: *const $t,
                _: f32,
                _: i32,
                _: *mut $t,
            );
            fn $rope_kv_write(
                _: Dim3,
                _: u32,
                _: *mut f32,
                _: *const u32,
                _: *const f32,
                _: *const f32,
                _: *const u32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: *mut $t,
                _: *mut $t,
            );
            fn $attention(
                _: Dim3,
                _: u32,
                _: *const f32,
                _: *const $t,
                _: *const $t,
                _: *const u32,
                _: *const u32,
                _: *const u32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: f32,
                _: *mut f32,
                _: *mut f32,
                _: *mut f32,
                _: *mut $t,
            );
            fn $attention_merge(
                _: Dim3,
                _: u32,
                _: *const f32,
                _: *const f32,
                _: *const f32,
                _: *const u32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: *mut $t,
            );
            fn $attention_prefill(
                _: Dim3,
                _: u32,
                _: *const f32,
                _: i32,
                _: *const $t,
                _: *const $t,
                _: *const u32,
                _: *const u32,
                _: *const u32,
                _: i32,
                _: *const u32,
                _: i32,
                _: i32,
                _: i32,
                _: i32,
                _: f32,
                _: *mut $t,
            );
            fn $silu_mul(_: Dim3, _: u32, _: *const f32, _: i32, _: usize, _: *mut $t);
            fn $fill_random(_: Dim3, _: u32, _: *mut $t, _: usize, _: u64, _: f32, _: f32);
        }
        const $name: Kernels<$t> = Kernels {
            embedding: $embedding,
            rms_norm: $rms_norm,
            rope_kv_write: $rope_kv_write,
            attention: $attention,
            attention_merge: $attention_merge,
            attention_prefill: $attention_prefill,
            silu_mul: $silu_mul,
            fill_random: $fill_random,
        };
    };
}

kernels!(BF16: bf16 = emu_embedding_bf16, emu_rms_norm_bf16, emu_rope_kv_write_bf16, emu_attention_bf16,
         emu_attention_merge_bf16, emu_attention_prefill_bf16, emu_silu_mul_bf16, emu_fill_random_bf16);
kernels!(F16: f16 = emu_embedding_f16, emu_rms_norm_f16, emu_rope_kv_write_f16, emu_attention_f16,
         emu_attention_merge_f16, emu_attention_prefill_f16, emu_silu_mul_f16, emu_fill_random_f16);

unsafe extern "C" {
    fn emu_argmax_rows(g: Dim3, b: u32, logits: *const f32, n: i32, out: *mut u32);
}

fn to<T: Elem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// Relative error a result rounded to T may carry (one rounding, sums of
/// a few hundred f32 terms).
fn tolerance<T: Elem>() -> f64 {
    if T::SUFFIX == "bf16" { 1e-2 } else { 2e-3 }
}

fn rms_norm<T: Elem>(kern: &Kernels<T>) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // 96: three warps; 1000: a full block of 1024 with idle threads.
    for (rows, dim) in [(3usize, 96usize), (2, 1000)] {
        let (x, delta, w) = (
            random(rows * dim, &mut rng),
            random(rows * dim, &mut rng),
            random(dim, &mut rng),
        );
        let picked: Vec<u32> = (0..rows as u32).rev().collect();
        let (mut gx, gw) = (x.clone(), to::<T>(&w));
        let mut out = vec![T::default(); rows * dim];
        let (g, b) = grid(launch::per_row(rows, dim));
        unsafe {
            (kern.rms_norm)(
                g,
                b,
                gx.as_mut_ptr(),
                delta.as_ptr(),
                picked.as_ptr(),
                gw.as_ptr(),
                1e-6,
                dim as i32,
                out.as_mut_ptr(),
            )
        };
        let (after, want) = reference::rms_norm(&x, Some(&delta), &picked, &to_f32(&gw), 1e-6);
        assert!(max_rel_error(&gx, &after) < 1e-6, "{} residual", T::SUFFIX);
        let err = max_rel_error(&to_f32(&out), &want);
        assert!(
            err < tolerance::<T>(),
            "{} rms_norm {rows}×{dim}: {err}",
            T::SUFFIX
        );
    }
}

/// RoPE on q in place, k rotated and v copied into their cache slots,
/// then paged attention over that cache: several splits and the merge,
/// and a single split writing its output itself; q read from rows of the
/// fused product (stride q + 2 kv).
fn rope_and_attention<T: Elem>(kern: &Kernels<T>, interleaved: bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (heads, kv_heads, hd, bs) = (4usize, 2usize, 64usize, 16usize);
    let (qd, width) = (heads * hd, kv_heads * hd);
    let row = qd + 2 * width;
    let case = PagedCase::new(&[(0, 1), (16, 1), (150, 1), (20, 20)], bs, &mut rng);
    let style = if interleaved {
        RopeStyle::Interleaved
    } else {
        RopeStyle::Half
    };
    let rope = crate::model::Rope::new(hd, 256, 10000.0, style);
    let (cos, sin) = rope.tables();
    let cache_len = case.num_blocks * bs * width;
    let (mut ck, mut cv) = (vec![T::default(); cache_len], vec![T::default(); cache_len]);

    let fill = case.fill();
    let mut qkv = random(fill.ids.len() * row, &mut rng);
    let (q, k, v) = (
        columns(&qkv, row, 0, qd),
        columns(&qkv, row, qd, width),
        columns(&qkv, row, qd + width, width),
    );
    let (g, b) = grid(launch::per_row(fill.ids.len(), (heads + kv_heads) * hd / 2));
    unsafe {
        (kern.rope_kv_write)(
            g,
            b,
            qkv.as_mut_ptr(),
            fill.positions.as_ptr(),
            cos.as_ptr(),
            sin.as_ptr(),
            fill.slots.as_ptr(),
            heads as i32,
            kv_heads as i32,
            hd as i32,
            interleaved as i32,
            bs as i32,
            ck.as_mut_ptr(),
            cv.as_mut_ptr(),
        )
    };
    let s = T::SUFFIX;
    let q_want = reference::rope(&q, &fill.positions, heads, hd, 10000.0, interleaved);
    let err = max_rel_error(&columns(&qkv, row, 0, qd), &q_want);
    assert!(err < 1e-5, "{s} rope of q: {err}");
    let k_want = reference::rope(&k, &fill.positions, kv_heads, hd, 10000.0, interleaved);
    let (ck32, cv32) = (to_f32(&ck), to_f32(&cv));
    let err = max_rel_error(&case.gather(&fill, &ck32, kv_heads, hd), &k_want);
    assert!(
        err < tolerance::<T>(),
        "{s} rotated keys in their slots: {err}"
    );
    assert_eq!(
        case.gather(&fill, &cv32, kv_heads, hd),
        to_f32(&to::<T>(&v)),
        "{s} values in their slots"
    );

    let ix = case.step();
    let rows_q = random(ix.ids.len() * row, &mut rng);
    let q = columns(&rows_q, row, 0, qd);
    let want = reference::attention(&q, &ck32, &cv32, &ix, heads, kv_heads, hd, bs);
    // 132 SMs ask for splits over 151 keys; 1 SM for none.
    for sms in [132, 1] {
        let plan = attention_plan(ix.ids.len(), heads, hd, ix.max_keys, sms).unwrap();
        let entries = ix.ids.len() * heads * plan.max_splits;
        let (mut m, mut l, mut acc) = (
            vec![0f32; entries],
            vec![0f32; entries],
            vec![0f32; entries * hd],
        );
        let mut out = vec![T::default(); ix.ids.len() * qd];
        let i = |v: usize| v as i32;
        let (g, b) = grid(plan.launch);
        unsafe {
            (kern.attention)(
                g,
                b,
                rows_q.as_ptr(),
                ck.as_ptr(),
                cv.as_ptr(),
                ix.row_seq.as_ptr(),
                ix.positions.as_ptr(),
                ix.tables.as_ptr(),
                i(ix.table_stride),
                i(heads),
                i(kv_heads),
                i(hd),
                i(bs),
                i(plan.partition),
                i(plan.max_splits),
                i(row),
                1.0 / (hd as f32).sqrt(),
                m.as_mut_ptr(),
                l.as_mut_ptr(),
                acc.as_mut_ptr(),
                out.as_mut_ptr(),
            )
        };
        if plan.max_splits > 1 {
            let (g, b) = grid(plan.merge);
            unsafe {
                (kern.attention_merge)(
                    g,
                    b,
                    m.as_ptr(),
                    l.as_ptr(),
                    acc.as_ptr(),
                    ix.positions.as_ptr(),
                    i(heads),
                    i(hd),
                    i(plan.partition),
                    i(plan.max_splits),
                    out.as_mut_ptr(),
                )
            };
        }
        let err = max_rel_error(&to_f32(&out), &want);
        assert!(
            err < tolerance::<T>(),
            "{s} attention, {} splits of {}: {err}",
            plan.max_splits,
            plan.partition
        );
        if sms == 132 {
            assert!(plan.max_splits >= 3, "{plan:?}");
        } else {
            assert_eq!(plan.max_splits, 1);
        }
    }
    // The tiled prefill kernel on the same step: the chunk of 20 rows is a
    // tile of 16 and one of 4; each decode is a tile of one.
    let plan = attention_plan(ix.ids.len(), heads, hd, ix.max_keys, 132).unwrap();
    let prefill = plan
        .with_prefill(&ix, heads, hd)
        .prefill
        .expect("a prefill step");
    assert_eq!(ix.tiles.len() / 2, 5);
    let mut out = vec![T::default(); ix.ids.len() * qd];
    let i = |v: usize| v as i32;
    let (g, b) = grid(prefill);
    unsafe {
        (kern.attention_prefill)(
            g,
            b,
            rows_q.as_ptr(),
            i(row),
            ck.as_ptr(),
            cv.as_ptr(),
            ix.row_seq.as_ptr(),
            ix.positions.as_ptr(),
            ix.tables.as_ptr(),
            i(ix.table_stride),
            ix.tiles.as_ptr(),
            i(heads),
            i(kv_heads),
            i(hd),
            i(bs),
            1.0 / (hd as f32).sqrt(),
            out.as_mut_ptr(),
        )
    };
    let err = max_rel_error(&to_f32(&out), &want);
    assert!(err < tolerance::<T>(), "{s} prefill attention: {err}");
}

fn elementwise<T: Elem>(kern: &Kernels<T>) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // SiLU · up over rows of [gate | up], a grid that strides.
    let (rows, inter) = (3usize, 700usize);
    let gu = random(rows * 2 * inter, &mut rng);
    let mut out = vec![T::default(); rows * inter];
    let (g, b) = grid(launch::elementwise(rows * inter, 1));
    unsafe {
        (kern.silu_mul)(
            g,
            b,
            gu.as_ptr(),
            inter as i32,
            rows * inter,
            out.as_mut_ptr(),
        )
    };
    let want = reference::silu_mul(
        &columns(&gu, 2 * inter, 0, inter),
        &columns(&gu, 2 * inter, inter, inter),
    );
    let err = max_rel_error(&to_f32(&out), &want);
    assert!(err < tolerance::<T>(), "{} silu_mul: {err}", T::SUFFIX);
    // Embedding rows 100..400 held: ids outside give zeros.
    let hidden = 64;
    let table = to::<T>(&random(300 * hidden, &mut rng));
    let ids = [100u32, 5, 399, 400, 250];
    let mut out = vec![1f32; ids.len() * hidden];
    let (g, b) = grid(launch::per_row(ids.len(), hidden));
    unsafe {
        (kern.embedding)(
            g,
            b,
            ids.as_ptr(),
            table.as_ptr(),
            100,
            300,
            hidden as i32,
            out.as_mut_ptr(),
        )
    };
    let want = reference::embedding(&ids, &to_f32(&table), 100, hidden);
    assert_eq!(max_rel_error(&out, &want), 0.0, "{} embedding", T::SUFFIX);
    // Random weights: within center ± scale (and a rounding: bf16's step
    // near 1 is 1/128), the same for a seed, centred.
    let n = 5000;
    let fill = |seed: u64| {
        let mut w = vec![T::default(); n];
        let (g, b) = grid(launch::elementwise(n, 2));
        unsafe { (kern.fill_random)(g, b, w.as_mut_ptr(), n, seed, 1.0, 0.05) };
        to_f32(&w)
    };
    let (a, again, other) = (fill(7), fill(7), fill(8));
    assert_eq!(a, again);
    assert_ne!(a, other);
    assert!(a.iter().all(|v| (0.94..=1.06).contains(v)), "{:?}", &a[..8]);
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!((mean - 1.0).abs() < 0.002, "mean {mean}");
}

#[test]
fn rms_norm_matches_the_reference() {
    rms_norm(&BF16);
    rms_norm(&F16);
}

#[test]
fn rope_cache_write_and_attention_match_the_reference() {
    rope_and_attention(&BF16, false);
    rope_and_attention(&F16, true);
}

/// The GPU's greedy pick is the host's `argmax`: random rows, a tie (the
/// lower index wins), a NaN first (never wins), a row of -inf (0), a
/// maximum in the last element of a row longer than the block.
#[test]
fn argmax_rows_picks_as_the_host_does() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let n = 1000;
    let mut rows: Vec<Vec<f32>> = (0..4).map(|_| random(n, &mut rng)).collect();
    rows[1][700] = 5.0;
    rows[1][300] = 5.0;
    rows[2][0] = f32::NAN;
    rows[2][999] = 9.0;
    rows.push(vec![f32::NEG_INFINITY; n]);
    let flat = rows.concat();
    let mut out = vec![u32::MAX; rows.len()];
    let (g, b) = grid(launch::argmax_rows(rows.len()));
    unsafe { emu_argmax_rows(g, b, flat.as_ptr(), n as i32, out.as_mut_ptr()) };
    let want: Vec<u32> = rows.iter().map(|r| crate::sampler::argmax(r)).collect();
    assert_eq!(out, want);
    assert_eq!([out[1], out[2], out[4]], [300, 999, 0]);
}

#[test]
fn elementwise_kernels_match_the_reference() {
    elementwise(&BF16);
    elementwise(&F16);
}
