//! One GPU: its stream, our kernels (loaded from the fatbin build.rs made)
//! and cuBLAS, with a typed call per kernel. Every call is enqueued on the
//! one stream and returns at once; `sync` or a download waits. Launch
//! parameters come from `gpu::launch`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use crate::error::{Result, WorkerError};
use crate::gpu::launch::{self, AttentionPlan, Launch};

/// The kernels, compiled by nvcc for `CUDA_COMPUTE_CAP` (see build.rs).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));
/// What compiled them, for the logs and the GPU check.
const FATBIN_BUILT_BY: &str = env!("AQUILA_KERNELS_BUILT_BY");

/// The kernels to load: `$AQUILA_CUDA_KERNELS` (a fatbin, cubin or PTX file
/// of kernels.cu, e.g. compiled by the GPU machine's own nvcc where its
/// driver is older than the toolkit that built this binary), else the
/// embedded fatbin. Returns (image, where it came from).
pub fn kernel_image() -> Result<(Vec<u8>, String)> {
    match std::env::var_os("AQUILA_CUDA_KERNELS") {
        Some(path) => {
            let image = std::fs::read(&path)
                .map_err(|e| WorkerError::io(format!("AQUILA_CUDA_KERNELS ({path:?})"), e))?;
            Ok((
                image,
                format!("{} (AQUILA_CUDA_KERNELS)", path.to_string_lossy()),
            ))
        }
        None => Ok((FATBIN.to_vec(), format!("embedded, {FATBIN_BUILT_BY}"))),
    }
}

pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> WorkerError {
    WorkerError::Comm(format!("CUDA {what}: {e:?}"))
}

/// An element type of weights, the KV cache and matrix-product inputs.
pub trait Elem:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + 'static
{
    /// The kernels' name suffix.
    const SUFFIX: &'static str;
    const CUDA: cudaDataType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const CUDA: cudaDataType = cudaDataType::CUDA_R_16BF;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl Elem for half::f16 {
    const SUFFIX: &'static str = "f16";
    const CUDA: cudaDataType = cudaDataType::CUDA_R_16F;
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// Launches kernel `$name` with `$l`, pushing `$args` in the order the
/// kernel declares them; an empty grid launches nothing.
macro_rules! launch {
    ($gpu:expr, $name:expr, $l:expr, [$($arg:expr),* $(,)?]) => {{
        let l: Launch = $l;
        let name: String = $name;
        if l.grid.0 == 0 || l.grid.1 == 0 || l.grid.2 == 0 {
            Ok(())
        } else {
            let f = $gpu.function(&name)?;
            let mut b = $gpu.stream.launch_builder(&f);
            $( b.arg($arg); )*
            // SAFETY: each caller passes the arguments its kernel declares,
            // in order, and buffers at least as long as the counts it passes.
            unsafe { b.launch(Gpu::config(l)) }
                .map(|_| ())
                .map_err(|e| cuda_err(&format!("launching {name}"), e))
        }
    }};
}

pub struct Gpu {
    pub stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: CudaBlas,
    /// cuBLAS's workspace, ours so that products can be captured in a CUDA
    /// graph (no allocation inside a capture).
    _blas_workspace: CudaSlice<u8>,
    /// Streaming multiprocessors, for launch sizes.
    pub sms: usize,
    pub name: String,
    /// Where the kernels came from (see `kernel_image`).
    pub kernels: String,
}

// SAFETY: cuBLAS handles may be used from any thread as long as calls do
// not overlap; the engine drives a Gpu from one thread at a time.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// GPU `ordinal` with a stream of its own (not the legacy default
    /// stream, on which CUDA graphs cannot be captured).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !available() {
            return Err(WorkerError::Config(
                "--device cuda needs the NVIDIA driver (libcuda) and cuBLAS, and neither loads \
                 here (they are looked up as libcuda.so.1 and libcublas.so or libcublas.so.12: \
                 link another version's file under that name on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err(&format!("GPU {ordinal}"), e))?;
        Self::on(single_stream(&ctx).map_err(|e| cuda_err("a stream", e))?)
    }

    /// On an existing stream (a tensor-parallel rank's, which NCCL uses too).
    pub fn on(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        let (image, kernels) = kernel_image()?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image))
            .map_err(|e| {
                cuda_err(
                    &format!(
                        "loading the kernels ({kernels}): a GPU older than the compute capability \
                         they were built for, or a driver older than the toolkit; compile \
                         worker/src/gpu/cuda/kernels.cu with this machine's nvcc and point \
                         AQUILA_CUDA_KERNELS at the file"
                    ),
                    e,
                )
            })?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("cuBLAS", e))?;
        // 32 MiB, what NVIDIA advises for Hopper.
        let workspace = stream
            .alloc_zeros::<u8>(32 << 20)
            .map_err(|e| cuda_err("cuBLAS workspace", e))?;
        {
            let (ptr, _w) = workspace.device_ptr(&stream);
            // SAFETY: the buffer lives as long as the handle (both in Self,
            // the handle dropped first) and is used on the handle's stream.
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut _,
                    workspace.len(),
                )
            }
            .result()
            .map_err(|e| cuda_err("cuBLAS workspace", e))?;
        }
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("device attributes", e))? as usize;
        let name = ctx.name().unwrap_or_else(|_| "an NVIDIA GPU".into());
        Ok(Self {
            stream,
            module,
            functions: Mutex::new(HashMap::new()),
            blas,
            _blas_workspace: workspace,
            sms,
            name,
            kernels,
        })
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| cuda_err(&format!("kernel {name}"), e))?;
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| cuda_err("upload", e))
    }

    /// Copies `host` to the start of `d` (which keeps its address).
    pub fn copy_into<T: DeviceRepr>(&self, host: &[T], d: &mut CudaSlice<T>) -> Result<()> {
        if host.len() > d.len() {
            return Err(WorkerError::Config(format!(
                "{} elements do not fit a device buffer of {}",
                host.len(),
                d.len()
            )));
        }
        self.stream
            .memcpy_htod(host, d)
            .map_err(|e| cuda_err("upload", e))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| cuda_err(&format!("allocating {n} elements"), e))
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, d: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(d)
            .map_err(|e| cuda_err("download", e))
    }

    /// Elements `range` of `d`.
    pub fn download_range<T: DeviceRepr + Default + Clone>(
        &self,
        d: &CudaSlice<T>,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<T>> {
        if range.end > d.len() {
            return Err(WorkerError::Config(format!(
                "elements {range:?} of a device buffer of {}",
                d.len()
            )));
        }
        self.stream
            .clone_dtoh(&d.slice(range))
            .map_err(|e| cuda_err("download", e))
    }

    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }

    fn config(l: Launch) -> LaunchConfig {
        LaunchConfig {
            grid_dim: l.grid,
            block_dim: (l.block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `out[t] = table[ids[t] − vocab_start]`, zeros for ids not held.
    pub fn embedding<T: Elem>(
        &self,
        ids: &CudaSlice<u32>,
        tokens: usize,
        table: &CudaSlice<T>,
        vocab: std::ops::Range<usize>,
        hidden: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (start, len, hidden_i) = (vocab.start as u32, vocab.len() as u32, hidden as i32);
        launch!(
            self,
            format!("embedding_{}", T::SUFFIX),
            launch::per_row(tokens, hidden),
            [ids, table, &start, &len, &hidden_i, out]
        )
    }

    /// `x += delta`, then `out[r] = norm(x[rows[r]]) · w` for `out_rows`
    /// rows (all rows when `rows` is None).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm<T: Elem>(
        &self,
        x: &mut CudaSlice<f32>,
        delta: Option<&CudaSlice<f32>>,
        rows: Option<&CudaSlice<u32>>,
        out_rows: usize,
        w: &CudaSlice<T>,
        eps: f32,
        dim: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let dim_i = dim as i32;
        // Absent inputs are null pointers.
        let delta = delta.map_or(0, |d| d.device_ptr(&self.stream).0);
        let rows = rows.map_or(0, |r| r.device_ptr(&self.stream).0);
        launch!(
            self,
            format!("rms_norm_{}", T::SUFFIX),
            launch::per_row(out_rows, dim),
            [x, &delta, &rows, w, &eps, &dim_i, out]
        )
    }

    /// RoPE on each token's q (in place) and k, and k and v written into
    /// the token's cache slot. `qkv` is `[tokens][q | k | v]`, the fused
    /// product's output.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_write<T: Elem>(
        &self,
        qkv: &mut CudaSlice<f32>,
        ix: &DeviceIndex,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        shape: AttentionShape,
        interleaved: bool,
        cache_k: &mut CudaSlice<T>,
        cache_v: &mut CudaSlice<T>,
    ) -> Result<()> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
            block_size,
        } = shape;
        let [h, kvh, hd, il, bs] =
            [heads, kv_heads, head_dim, interleaved as usize, block_size].map(|v| v as i32);
        launch!(
            self,
            format!("rope_kv_write_{}", T::SUFFIX),
            launch::per_row(ix.rows, (heads + kv_heads) * head_dim / 2),
            [
                qkv,
                &ix.positions,
                cos,
                sin,
                &ix.slots,
                &h,
                &kvh,
                &hd,
                &il,
                &bs,
                cache_k,
                cache_v
            ]
        )
    }

    /// Paged attention of every row into `out` (`[rows][heads][head_dim]`):
    /// the tiled prefill kernel where the plan has it, else the split
    /// kernel and (with several splits) the merge of its splits. Rows of
    /// `q` are `q_stride` floats apart.
    #[allow(clippy::too_many_arguments)]
    pub fn attention<T: Elem>(
        &self,
        q: &CudaSlice<f32>,
        q_stride: usize,
        cache_k: &CudaSlice<T>,
        cache_v: &CudaSlice<T>,
        ix: &DeviceIndex,
        plan: &AttentionPlan,
        shape: AttentionShape,
        scratch: &mut AttentionScratch,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let [
            heads,
            kv_heads,
            head_dim,
            block_size,
            stride,
            q_stride,
            partition,
            splits,
        ] = [
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            shape.block_size,
            ix.table_stride,
            q_stride,
            plan.partition,
            plan.max_splits,
        ]
        .map(|v| v as i32);
        if let Some(l) = plan.prefill {
            return launch!(
                self,
                format!("attention_prefill_{}", T::SUFFIX),
                l,
                [
                    q,
                    &q_stride,
                    cache_k,
                    cache_v,
                    &ix.row_seq,
                    &ix.positions,
                    &ix.tables,
                    &stride,
                    &ix.tiles,
                    &heads,
                    &kv_heads,
                    &head_dim,
                    &block_size,
                    &scale,
                    out,
                ]
            );
        }
        scratch.reserve(
            self,
            ix.rows * shape.heads * plan.max_splits,
            shape.head_dim,
        )?;
        launch!(
            self,
            format!("attention_{}", T::SUFFIX),
            plan.launch,
            [
                q,
                cache_k,
                cache_v,
                &ix.row_seq,
                &ix.positions,
                &ix.tables,
                &stride,
                &heads,
                &kv_heads,
                &head_dim,
                &block_size,
                &partition,
                &splits,
                &q_stride,
                &scale,
                &mut scratch.m,
                &mut scratch.l,
                &mut scratch.acc,
                &mut *out,
            ]
        )?;
        if plan.max_splits == 1 {
            return Ok(()); // the kernel wrote `out` itself
        }
        launch!(
            self,
            format!("attention_merge_{}", T::SUFFIX),
            plan.merge,
            [
                &scratch.m,
                &scratch.l,
                &scratch.acc,
                &ix.positions,
                &heads,
                &head_dim,
                &partition,
                &splits,
                out,
            ]
        )
    }

    /// `out[r] = silu(gate[r]) · up[r]` for `rows` rows of `gate_up`
    /// (`[rows][gate | up]`, `inter` each).
    pub fn silu_mul<T: Elem>(
        &self,
        gate_up: &CudaSlice<f32>,
        rows: usize,
        inter: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let (n, inter_i) = (rows * inter, inter as i32);
        let n64 = n as u64;
        launch!(
            self,
            format!("silu_mul_{}", T::SUFFIX),
            launch::elementwise(n, self.sms),
            [gate_up, &inter_i, &n64, out]
        )
    }

    /// `out[r]` = the index of row r's largest logit (rows of `n`), lowest
    /// index on ties, as `sampler::argmax`.
    pub fn argmax_rows(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        n: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let n_i = n as i32;
        launch!(
            self,
            "argmax_rows".to_string(),
            launch::argmax_rows(rows),
            [logits, &n_i, out]
        )
    }

    /// `center + scale · u`, u uniform in [-1, 1) from (seed, index).
    pub fn fill_random<T: Elem>(
        &self,
        out: &mut CudaSlice<T>,
        seed: u64,
        center: f32,
        scale: f32,
    ) -> Result<()> {
        let n = out.len();
        let n64 = n as u64;
        launch!(
            self,
            format!("fill_random_{}", T::SUFFIX),
            launch::elementwise(n, self.sms),
            [out, &n64, &seed, &center, &scale]
        )
    }

    /// `y[rows][out] = x[rows][in] · w[out][in]ᵀ`, inputs T, sums and result
    /// f32 (cuBLAS, tensor cores where the GPU has them).
    pub fn gemm<T: Elem>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        rows: usize,
        input: usize,
        output: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let g = launch::gemm(rows, input, output)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wp, _w) = w.device_ptr(&self.stream);
        let (xp, _x) = x.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        // SAFETY: w holds output × input elements, x rows × input, y rows ×
        // output (the callers size them so); the handle is on our stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                g.m,
                g.n,
                g.k,
                (&alpha as *const f32).cast(),
                wp as *const _,
                T::CUDA,
                g.lda,
                xp as *const _,
                T::CUDA,
                g.ldb,
                (&beta as *const f32).cast(),
                yp as *mut _,
                cudaDataType::CUDA_R_32F,
                g.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuBLAS GemmEx", e))
    }

    /// Milliseconds `f` takes on the stream (events around it).
    pub fn time(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = self
            .stream
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("event", e))?;
        f()?;
        let end = self
            .stream
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("event", e))?;
        end.synchronize().map_err(|e| cuda_err("event", e))?;
        start.elapsed_ms(&end).map_err(|e| cuda_err("event", e))
    }
}

/// A new stream on `ctx` for everything this process does on the GPU
/// (kernels, products, copies, NCCL): one stream orders them all, so
/// cudarc's tracking of buffers across streams (an event recorded per
/// buffer per launch) is turned off first.
pub fn single_stream(
    ctx: &Arc<CudaContext>,
) -> std::result::Result<Arc<CudaStream>, cudarc::driver::DriverError> {
    // SAFETY: every buffer of this context is used on the one stream made
    // here, so no use needs ordering against another stream.
    unsafe { ctx.disable_event_tracking() };
    ctx.new_stream()
}

/// Whether the CUDA driver and cuBLAS can be loaded here.
pub fn available() -> bool {
    // SAFETY: these only try to open the shared libraries.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::cublas::sys::is_culib_present() }
}

/// The attention shape of a model (this rank's heads).
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// A step's index arrays on the device (see `launch::StepIndex`).
pub struct DeviceIndex {
    pub rows: usize,
    pub ids: CudaSlice<u32>,
    pub positions: CudaSlice<u32>,
    pub slots: CudaSlice<u32>,
    pub row_seq: CudaSlice<u32>,
    pub tables: CudaSlice<u32>,
    pub table_stride: usize,
    pub logit_rows: CudaSlice<u32>,
    pub logit_count: usize,
    /// Prefill attention's tiles (pairs: first row, rows).
    pub tiles: CudaSlice<u32>,
}

impl DeviceIndex {
    pub fn upload(gpu: &Gpu, ix: &launch::StepIndex) -> Result<Self> {
        Ok(Self {
            rows: ix.ids.len(),
            ids: gpu.upload(&ix.ids)?,
            positions: gpu.upload(&ix.positions)?,
            slots: gpu.upload(&ix.slots)?,
            row_seq: gpu.upload(&ix.row_seq)?,
            tables: gpu.upload(&ix.tables)?,
            table_stride: ix.table_stride,
            logit_rows: gpu.upload(&ix.logit_rows)?,
            logit_count: ix.logit_rows.len(),
            tiles: gpu.upload(&ix.tiles)?,
        })
    }

    /// Buffers for steps of up to `rows` tokens and `rows` tables of
    /// `stride` entries, filled by [`write`](Self::write): their addresses
    /// never change, which is what a CUDA graph replaying steps needs.
    pub fn with_capacity(gpu: &Gpu, rows: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            rows: 0,
            ids: gpu.zeros(rows)?,
            positions: gpu.zeros(rows)?,
            slots: gpu.zeros(rows)?,
            row_seq: gpu.zeros(rows)?,
            tables: gpu.zeros(rows * stride)?,
            table_stride: stride,
            logit_rows: gpu.zeros(rows)?,
            logit_count: 0,
            tiles: gpu.zeros(2 * rows)?,
        })
    }

    /// `ix` into these buffers (an error if it does not fit).
    pub fn write(&mut self, gpu: &Gpu, ix: &launch::StepIndex) -> Result<()> {
        gpu.copy_into(&ix.ids, &mut self.ids)?;
        gpu.copy_into(&ix.positions, &mut self.positions)?;
        gpu.copy_into(&ix.slots, &mut self.slots)?;
        gpu.copy_into(&ix.row_seq, &mut self.row_seq)?;
        gpu.copy_into(&ix.tables, &mut self.tables)?;
        gpu.copy_into(&ix.logit_rows, &mut self.logit_rows)?;
        gpu.copy_into(&ix.tiles, &mut self.tiles)?;
        self.rows = ix.ids.len();
        self.table_stride = ix.table_stride;
        self.logit_count = ix.logit_rows.len();
        Ok(())
    }
}

/// The attention kernel's per-split partial results, grown as needed.
pub struct AttentionScratch {
    m: CudaSlice<f32>,
    l: CudaSlice<f32>,
    acc: CudaSlice<f32>,
}

impl AttentionScratch {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Self {
            m: gpu.zeros(1)?,
            l: gpu.zeros(1)?,
            acc: gpu.zeros(1)?,
        })
    }

    /// Room for `entries` partial results from the start: a CUDA graph's
    /// scratch, which must never move.
    pub fn with_capacity(gpu: &Gpu, entries: usize, head_dim: usize) -> Result<Self> {
        let mut s = Self::new(gpu)?;
        s.reserve(gpu, entries, head_dim)?;
        Ok(s)
    }

    fn reserve(&mut self, gpu: &Gpu, entries: usize, head_dim: usize) -> Result<()> {
        if self.m.len() < entries {
            self.m = gpu.zeros(entries)?;
            self.l = gpu.zeros(entries)?;
            self.acc = gpu.zeros(entries * head_dim)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI), opening one says what is missing instead of
    /// crashing; with one, a product through cuBLAS and a kernel run.
    #[test]
    fn a_gpu_or_a_clear_error() {
        match Gpu::new(0) {
            Err(e) => {
                assert!(!available(), "CUDA is loadable, yet: {e}");
                assert!(e.to_string().contains("NVIDIA driver (libcuda)"), "{e}");
            }
            Ok(gpu) => {
                // [1, 2] · [[1, 2], [3, 4]]ᵀ = [5, 11]
                let x = gpu
                    .upload(&[half::bf16::from_f32(1.0), half::bf16::from_f32(2.0)])
                    .unwrap();
                let w: Vec<half::bf16> = [1.0f32, 2.0, 3.0, 4.0].map(half::bf16::from_f32).to_vec();
                let w = gpu.upload(&w).unwrap();
                let mut y = gpu.zeros::<f32>(2).unwrap();
                gpu.gemm(&x, &w, 1, 2, 2, &mut y).unwrap();
                assert_eq!(gpu.download(&y).unwrap(), [5.0, 11.0]);
                let mut out = gpu.zeros::<half::bf16>(2).unwrap();
                let gu = gpu.upload(&[0.0f32, 1.0, 3.0, 2.0]).unwrap();
                gpu.silu_mul(&gu, 1, 2, &mut out).unwrap();
                let out: Vec<f32> = gpu
                    .download(&out)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                assert_eq!(out[0], 0.0);
                assert!(
                    (out[1] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-2,
                    "{out:?}"
                );
            }
        }
    }
}
