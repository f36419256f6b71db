// lora.hpp internals: packing the operands of the packed GEMM (include/lora/detail/gemm.hpp).
//
// A block of A (mc x kc) becomes panels of MR rows: panel q holds, for each p in [0, kc), the MR values
// A(q MR + r, p) side by side. A block of B (kc x nc) becomes panels of NR columns: panel q holds, for
// each p, the NR values B(p, q NR + c). Rows (columns) past the block's edge are zeros, so the
// micro-kernel always runs a full MR x NR tile and only its store is clipped. Sources are read through
// (row stride, column stride), which covers row- and column-major matrices, Maps and Blocks.
#pragma once

#include <lora/common.hpp>
#include <lora/detail/gemm_kernels.hpp>

#include <algorithm>

namespace lora::detail::gemm_pack {

// One full panel (MR rows) of a source contiguous along p (cs == 1: A row-major, B = W^T with W
// row-major), transposed W x W at a time in vector registers, W = the packet width: the rows are taken
// in G = ceil(MR / W) groups of W (the last padded with zeros), and for each step p the G transposed
// packets are stored at dst + p MR + g W. A padded group's store runs G W - MR values into step p + 1's
// slots, which the next store rewrites, so when it spills the last block keeps a step after it for the
// scalar loop. Returns the number of steps packed (a multiple of W).
template <int MR, class Scalar>
Index pack_panel_transposed(const Scalar* src, Index rs, Index kc, Scalar* dst) {
  using V = gemm_kernel::EigenPacket<Scalar>;
  constexpr int W = V::width, G = (MR + W - 1) / W, spill = G * W - MR;
  if constexpr (W == 1 || spill > MR) {
    return 0;
  } else {
    const Index blocks = spill == 0 ? kc / W : (kc - 1) / W;
    for (Index q = 0; q < blocks; ++q) {
      const Index p0 = q * W;
      typename V::Block block[G];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
#pragma GCC unroll 16
        for (int r = 0; r < W; ++r)
          block[g].packet[r] = g * W + r < MR ? V::load(src + (g * W + r) * rs + p0) : V::zero();
        V::transpose(block[g]);
      }
#pragma GCC unroll 16
      for (int p = 0; p < W; ++p)
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) V::store(dst + (p0 + p) * MR + g * W, block[g].packet[p]);
    }
    return blocks * W;
  }
}

// A(i, p) = a[i * rs + p * cs], i in [0, mc), p in [0, kc), into ceil(mc / MR) panels of MR x kc at dst.
template <int MR, class Scalar>
void pack_a(const Scalar* a, Index rs, Index cs, Index mc, Index kc, Scalar* dst) {
  for (Index i = 0; i < mc; i += MR, dst += MR * kc) {
    const Index rows = std::min<Index>(MR, mc - i);
    const Scalar* src = a + i * rs;
    if (rows == MR && rs == 1) {  // contiguous along i (A column-major, B row-major): MR values a step
      for (Index p = 0; p < kc; ++p)
        for (int r = 0; r < MR; ++r) dst[p * MR + r] = src[p * cs + r];
    } else if (rows == MR && cs == 1) {  // contiguous along p: transposed in registers, the tail step by step
      for (Index p = pack_panel_transposed<MR>(src, rs, kc, dst); p < kc; ++p)
        for (int r = 0; r < MR; ++r) dst[p * MR + r] = src[r * rs + p];
    } else if (rows == MR) {  // any other stride: row by row
      for (int r = 0; r < MR; ++r)
        for (Index p = 0; p < kc; ++p) dst[p * MR + r] = src[r * rs + p * cs];
    } else {
      for (Index p = 0; p < kc; ++p)
        for (int r = 0; r < MR; ++r) dst[p * MR + r] = r < rows ? src[r * rs + p * cs] : Scalar(0);
    }
  }
}

// B(p, j) = b[p * rs + j * cs], p in [0, kc), j in [0, nc), into ceil(nc / NR) panels of kc x NR at dst:
// the panels of B's columns are pack_a's panels of B^T's rows.
template <int NR, class Scalar>
void pack_b(const Scalar* b, Index rs, Index cs, Index kc, Index nc, Scalar* dst) {
  pack_a<NR>(b, cs, rs, nc, kc, dst);
}

// pack_a's panels of [A | 1] when `ones`: MR x (kc + 1) each, the last step 1 in the rows inside the block.
template <int MR, class Scalar>
void pack_a_ones(const Scalar* a, Index rs, Index cs, Index mc, Index kc, bool ones, Scalar* dst) {
  const Index k = kc + (ones ? 1 : 0);
  for (Index i = 0; i < mc; i += MR, dst += MR * k) {
    const Index rows = std::min<Index>(MR, mc - i);
    const Scalar* src = a + i * rs;
    for (Index p = 0; p < kc; ++p)
      for (int r = 0; r < MR; ++r) dst[p * MR + r] = r < rows ? src[r * rs + p * cs] : Scalar(0);
    if (ones)
      for (int r = 0; r < MR; ++r) dst[kc * MR + r] = r < rows ? Scalar(1) : Scalar(0);
  }
}

// pack_b's panels of [B; row^T] when `row` is given: (kc + 1) x NR each, the last step row[j].
template <int NR, class Scalar>
void pack_b_row(const Scalar* b, Index rs, Index cs, Index kc, Index nc, const Scalar* row, Scalar* dst) {
  const Index k = kc + (row ? 1 : 0);
  for (Index j = 0; j < nc; j += NR, dst += NR * k) {
    const Index cols = std::min<Index>(NR, nc - j);
    for (Index p = 0; p < kc; ++p)
      for (int c = 0; c < NR; ++c) dst[p * NR + c] = c < cols ? b[p * rs + (j + c) * cs] : Scalar(0);
    if (row)
      for (int c = 0; c < NR; ++c) dst[kc * NR + c] = c < cols ? row[j + c] : Scalar(0);
  }
}

}  // namespace lora::detail::gemm_pack
