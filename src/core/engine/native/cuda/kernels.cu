// The CUDA backend's kernels, compiled at start-up by NVRTC (so the binary needs no CUDA toolkit to build).
// Activations, norms and KV pages are f32; matrix products go to cuBLAS. One kernel per Backend op, same
// semantics as the CPU backend, which `dynamo selftest --device cuda` checks op by op.

extern "C" __global__ void embedding(const float* table, const unsigned int* ids, float* out, int cols, int vocab) {
    int row = blockIdx.x;
    unsigned int id = ids[row];
    if (id >= (unsigned int)vocab) id = vocab - 1;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(long)row * cols + c] = table[(long)id * cols + c];
}

// One block per row; blockDim.x must be a power of two.
extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, int dim, float eps) {
    extern __shared__ float partial[];
    const float* in = x + (long)blockIdx.x * dim;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) sum += in[c] * in[c];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    float scale = rsqrtf(partial[0] / dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) out[(long)blockIdx.x * dim + c] = in[c] * scale * weight[c];
}

// Rotates half against half, in place; one block per row.
extern "C" __global__ void rope(float* x, const unsigned int* positions, const float* inv_freq, int heads, int head_dim) {
    int half = head_dim / 2;
    float position = (float)positions[blockIdx.x];
    float* row = x + (long)blockIdx.x * heads * head_dim;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        int head = i / half, j = i % half;
        float s, c;
        sincosf(position * inv_freq[j], &s, &c);
        float a = row[head * head_dim + j], b = row[head * head_dim + j + half];
        row[head * head_dim + j] = a * c - b * s;
        row[head * head_dim + j + half] = b * c + a * s;
    }
}

extern "C" __global__ void silu_mul(float* gate, const float* up, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { float g = gate[i]; gate[i] = g / (1.0f + expf(-g)) * up[i]; }
}

extern "C" __global__ void add(float* x, const float* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void add_bias(float* x, const float* bias, long n, int width) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += bias[i % width];
}

extern "C" __global__ void gather_rows(const float* x, const unsigned int* rows, float* out, int dim) {
    for (int c = threadIdx.x; c < dim; c += blockDim.x) out[(long)blockIdx.x * dim + c] = x[(long)rows[blockIdx.x] * dim + c];
}

extern "C" __global__ void write_kv(const float* k, const float* v, const unsigned int* slots, float* k_pages, float* v_pages, int width) {
    long slot = slots[blockIdx.x];
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        k_pages[slot * width + c] = k[(long)blockIdx.x * width + c];
        v_pages[slot * width + c] = v[(long)blockIdx.x * width + c];
    }
}

extern "C" __global__ void copy_pages(const float* from, float* to, const unsigned int* from_ids, const unsigned int* to_ids, int page_len) {
    long src = (long)from_ids[blockIdx.x] * page_len, dst = (long)to_ids[blockIdx.x] * page_len;
    for (int c = threadIdx.x; c < page_len; c += blockDim.x) to[dst + c] = from[src + c];
}

// One block per (row, head), one thread per element of head_dim (blockDim.x = head_dim rounded up to a power
// of two). Online softmax over the row's context, one position at a time: correct and simple; a tiled kernel
// is the next step for speed.
extern "C" __global__ void paged_attention(
    const float* q, const float* k_pages, const float* v_pages,
    const unsigned int* row_context,      // positions the row attends to (its position + 1)
    const unsigned int* row_table,        // offset of the row's block table in `tables`
    const unsigned int* tables,
    float* out, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale) {
    extern __shared__ float partial[];
    int row = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
    int kv_head = head / (num_heads / num_kv_heads);
    int kv_width = num_kv_heads * head_dim;
    const unsigned int* table = tables + row_table[row];
    float query = d < head_dim ? q[((long)row * num_heads + head) * head_dim + d] : 0.0f;
    float max_score = __int_as_float(0xff800000), total = 0.0f, acc = 0.0f;  // -inf: NVRTC has no math.h
    for (unsigned int p = 0; p < row_context[row]; ++p) {
        long slot = (long)table[p / block_size] * block_size + p % block_size;
        long at = slot * kv_width + kv_head * head_dim + d;
        partial[d] = d < head_dim ? query * k_pages[at] : 0.0f;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
            if (d < stride) partial[d] += partial[d + stride];
            __syncthreads();
        }
        float score = partial[0] * scale;
        __syncthreads();
        float new_max = fmaxf(max_score, score);
        float correction = expf(max_score - new_max), weight = expf(score - new_max);
        total = total * correction + weight;
        acc = acc * correction + (d < head_dim ? weight * v_pages[at] : 0.0f);
        max_score = new_max;
    }
    if (d < head_dim) out[((long)row * num_heads + head) * head_dim + d] = acc / total;
}
