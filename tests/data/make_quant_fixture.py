#!/usr/bin/env python3
"""Writes quant_fixture.json: NF4 (with and without double quantization) and int8 codes, scales and
dequantized values for test_quant, computed here independently of the library with numpy, following the
published algorithms as bitsandbytes implements them (float32 throughout):

  NF4: blocks of 64 consecutive weights of the row-major flattened W; absmax per block; x = w * (1 / absmax);
       code = argmin_k |x - NF4[k]| (ties to the lower k); two codes per byte, the first in the high nibble.
  double quantization: offset = mean(absmax); (absmax - offset) in blocks of 256, each scaled by its own
       absmax2 and coded as argmin over bitsandbytes' signed 8-bit dynamic map (QuantState.state2.code).
  int8: one absmax s per row, q = round_half_even(w * (127 / s)).

Usage: /usr/bin/python3 tests/data/make_quant_fixture.py [--bitsandbytes]
With --bitsandbytes (a Python with bitsandbytes >= 0.47 and torch >= 2.3), the NF4 results are also
compared with bitsandbytes.functional.quantize_4bit(..., quant_type="nf4", blocksize=64,
compress_statistics=True), and the script fails on any difference.
"""
import json
import os
import sys

import numpy as np

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)


# bitsandbytes' signed 8-bit dynamic map as its nested (double) quantization uses it: the float32 values of
# QuantState.state2.code (bitsandbytes 0.47; create_dynamic_map(signed=True) with its lowest entry -1).
DYN = np.array([
      -1.0, -0.9789062738418579, -0.96484375, -0.9507812261581421, -0.936718761920929, -0.922656238079071,
      -0.9085937738418579, -0.89453125, -0.8804687261581421, -0.866406261920929, -0.852343738079071, -0.8382812738418579,
      -0.82421875, -0.8101562261581421, -0.796093761920929, -0.782031238079071, -0.7679687738418579, -0.75390625,
      -0.7398437261581421, -0.725781261920929, -0.7117187976837158, -0.6976562738418579, -0.68359375, -0.6695312261581421,
      -0.655468761920929, -0.6414062976837158, -0.6273437738418579, -0.61328125, -0.5992187261581421, -0.585156261920929,
      -0.5710937976837158, -0.5570312738418579, -0.54296875, -0.5289062261581421, -0.5148437023162842, -0.500781238079071,
      -0.48671871423721313, -0.47265625, -0.4585937261581421, -0.44453126192092896, -0.43046873807907104, -0.4164062440395355,
      -0.40234375, -0.3882812261581421, -0.37421876192092896, -0.36015623807907104, -0.3460937440395355, -0.33203125,
      -0.3179687261581421, -0.30390626192092896, -0.28984373807907104, -0.2757812738418579, -0.26171875, -0.24765624105930328,
      -0.23359374701976776, -0.21953125298023224, -0.20546874403953552, -0.19140625, -0.17734375596046448, -0.16328124701976776,
      -0.14921875298023224, -0.13515624403953552, -0.12109375, -0.10703125596046448, -0.09859374910593033, -0.09578125923871994,
      -0.09296875447034836, -0.09015624970197678, -0.08734375238418579, -0.08453124761581421, -0.08171875774860382, -0.07890625298023224,
      -0.07609374821186066, -0.07328125089406967, -0.07046874612569809, -0.0676562562584877, -0.06484375149011612, -0.062031250447034836,
      -0.05921875312924385, -0.05640624836087227, -0.053593751043081284, -0.05078125, -0.047968748956918716, -0.04515625163912773,
      -0.04234374687075615, -0.039531249552965164, -0.03671875223517418, -0.033906251192092896, -0.031093750149011612, -0.028281250968575478,
      -0.025468749925494194, -0.02265625074505806, -0.019843751564621925, -0.017031250521540642, -0.014218750409781933, -0.011406250298023224,
      -0.009718749672174454, -0.009156249463558197, -0.008593750186264515, -0.008031249977648258, -0.0074687497690320015, -0.006906250026077032,
      -0.006343749817460775, -0.005781250074505806, -0.0052187503315508366, -0.0046562496572732925, -0.004093749914318323, -0.0035312497057020664,
      -0.002968749962747097, -0.002406249986961484, -0.001843750011175871, -0.001281249918974936, -0.0009437500848434865, -0.0008312499849125743,
      -0.0007187500596046448, -0.0006062500760890543, -0.000493750034365803, -0.0003812500217463821, -0.0002687500382307917, -0.00015625001105945557,
      -8.874999912222847e-05, -6.625000241911039e-05, -4.374999844003469e-05, -2.1249998098937795e-05, -7.749999895168003e-06, -3.250000190746505e-06,
      -5.500000384017767e-07, 0.0, 5.500000384017767e-07, 3.250000190746505e-06, 7.749999895168003e-06, 2.1249998098937795e-05,
      4.374999844003469e-05, 6.625000241911039e-05, 8.874999912222847e-05, 0.00015625001105945557, 0.0002687500382307917, 0.0003812500217463821,
      0.000493750034365803, 0.0006062500760890543, 0.0007187500596046448, 0.0008312499849125743, 0.0009437500848434865, 0.001281249918974936,
      0.001843750011175871, 0.002406249986961484, 0.002968749962747097, 0.0035312497057020664, 0.004093749914318323, 0.0046562496572732925,
      0.0052187503315508366, 0.005781250074505806, 0.006343749817460775, 0.006906250026077032, 0.0074687497690320015, 0.008031249977648258,
      0.008593750186264515, 0.009156249463558197, 0.009718749672174454, 0.011406250298023224, 0.014218750409781933, 0.017031250521540642,
      0.019843751564621925, 0.02265625074505806, 0.025468749925494194, 0.028281250968575478, 0.031093750149011612, 0.033906251192092896,
      0.03671875223517418, 0.039531249552965164, 0.04234374687075615, 0.04515625163912773, 0.047968748956918716, 0.05078125,
      0.053593751043081284, 0.05640624836087227, 0.05921875312924385, 0.062031250447034836, 0.06484375149011612, 0.0676562562584877,
      0.07046874612569809, 0.07328125089406967, 0.07609374821186066, 0.07890625298023224, 0.08171875774860382, 0.08453124761581421,
      0.08734375238418579, 0.09015624970197678, 0.09296875447034836, 0.09578125923871994, 0.09859374910593033, 0.10703125596046448,
      0.12109375, 0.13515624403953552, 0.14921875298023224, 0.16328124701976776, 0.17734375596046448, 0.19140625,
      0.20546874403953552, 0.21953125298023224, 0.23359374701976776, 0.24765624105930328, 0.26171875, 0.2757812738418579,
      0.28984373807907104, 0.30390626192092896, 0.3179687261581421, 0.33203125, 0.3460937440395355, 0.36015623807907104,
      0.37421876192092896, 0.3882812261581421, 0.40234375, 0.4164062440395355, 0.43046873807907104, 0.44453126192092896,
      0.4585937261581421, 0.47265625, 0.48671871423721313, 0.500781238079071, 0.5148437023162842, 0.5289062261581421,
      0.54296875, 0.5570312738418579, 0.5710937976837158, 0.585156261920929, 0.5992187261581421, 0.61328125,
      0.6273437738418579, 0.6414062976837158, 0.655468761920929, 0.6695312261581421, 0.68359375, 0.6976562738418579,
      0.7117187976837158, 0.725781261920929, 0.7398437261581421, 0.75390625, 0.7679687738418579, 0.782031238079071,
      0.796093761920929, 0.8101562261581421, 0.82421875, 0.8382812738418579, 0.852343738079071, 0.866406261920929,
      0.8804687261581421, 0.89453125, 0.9085937738418579, 0.922656238079071, 0.936718761920929, 0.9507812261581421,
      0.96484375, 0.9789062738418579, 0.992968738079071, 1.0], dtype=np.float32)


def nearest(x, table):
    return np.argmin(np.abs(x[:, None] - table[None, :]), axis=1)  # first minimum: ties to the lower code


def weights(rows, cols):
    # Exactly reproducible in C++: integer arithmetic and one double division and product, then float32.
    i = np.arange(rows * cols, dtype=np.int64)
    v = ((i * 7919) % 2001 - 1000).astype(np.float64) / 1000.0 * (1.0 + ((i // 64) % 17) / 4.0)
    return v.astype(np.float32).reshape(rows, cols)


def blockwise(x, bs, table):
    """Per block of bs values: absmax, and each value's nearest table entry of x * (1 / absmax)."""
    nb = (x.size + bs - 1) // bs
    absmax = np.array([np.abs(x[b * bs:(b + 1) * bs]).max() for b in range(nb)], dtype=np.float32)
    codes = np.empty(x.size, dtype=np.uint8)
    for b in range(nb):
        inv = np.float32(1.0) / absmax[b] if absmax[b] > 0 else np.float32(0.0)
        codes[b * bs:(b + 1) * bs] = nearest(np.clip(x[b * bs:(b + 1) * bs] * inv, -1, 1), table)
    return absmax, codes


def nf4(W, double_quant, bs=64, bs2=256):
    w = W.reshape(-1)
    n = w.size
    nb = (n + bs - 1) // bs
    absmax, codes = blockwise(w, bs, NF4)
    if n % 2:
        codes = np.append(codes, 0)
    packed = (codes[0::2] << 4) | codes[1::2]
    out = {"packed": packed.astype(np.uint8)}
    if not double_quant:
        out["absmax"] = absmax
        scale = absmax
    else:
        offset = np.float32(absmax.mean(dtype=np.float64))
        centred = absmax - offset
        absmax2, q = blockwise(centred, bs2, DYN)
        out.update(qabsmax=q, absmax2=absmax2, offset=offset)
        scale = DYN[q] * absmax2[np.arange(nb) // bs2] + offset
    deq = NF4[codes[:n]] * scale[np.arange(n) // bs]
    out["dequantized"] = deq.astype(np.float32)
    return out


def int8(W):
    s = np.abs(W).max(axis=1).astype(np.float32)
    scale = np.where(s > 0, np.float32(127.0) / np.where(s > 0, s, 1), 0).astype(np.float32)
    q = np.rint(W * scale[:, None]).astype(np.int8)
    deq = q.astype(np.float32) * (s / np.float32(127.0))[:, None]
    return {"codes": q.view(np.uint8).reshape(-1), "absmax": s, "dequantized": deq.reshape(-1)}


def hexs(a):
    return a.astype(np.uint8).tobytes().hex()


def floats(a):
    return [float(x) for x in np.asarray(a, dtype=np.float32).reshape(-1)]


def main():
    cases = []
    for rows, cols in [(3, 40), (5, 13), (7, 2400)]:  # tail block; odd total; > 256 blocks, two absmax2 blocks
        W = weights(rows, cols)
        case = {"rows": rows, "cols": cols}
        for name, dq in [("nf4_dq", True), ("nf4", False)]:
            r = nf4(W, dq)
            c = {"codes": hexs(r["packed"])}
            if dq:
                c.update(qabsmax=hexs(r["qabsmax"]), absmax2=floats(r["absmax2"]), offset=float(r["offset"]))
            else:
                c["absmax"] = floats(r["absmax"])
            d = r["dequantized"]
            c["dequantized_sample"] = floats(d[:: max(1, d.size // 97)])
            c["dequantized_sum"] = float(d.astype(np.float64).sum())
            case[name] = c
        r = int8(W)
        d = r["dequantized"]
        case["int8"] = {"codes": hexs(r["codes"]), "absmax": floats(r["absmax"]),
                        "dequantized_sample": floats(d[:: max(1, d.size // 97)]),
                        "dequantized_sum": float(d.astype(np.float64).sum())}
        case["sample_stride"] = max(1, rows * cols // 97)
        cases.append(case)
        if "--bitsandbytes" in sys.argv and rows * cols % 2:
            print(f"{rows}x{cols}: odd total, which bitsandbytes' CPU quantize_4bit cannot pack; not compared")
        elif "--bitsandbytes" in sys.argv:
            import torch
            import bitsandbytes.functional as F
            q, st = F.quantize_4bit(torch.from_numpy(W), blocksize=64, quant_type="nf4", compress_statistics=True)
            ours = nf4(W, True)
            assert np.array_equal(q.numpy().reshape(-1), ours["packed"]), f"{rows}x{cols}: NF4 codes differ"
            assert np.array_equal(st.absmax.numpy(), ours["qabsmax"]), f"{rows}x{cols}: absmax codes differ"
            assert np.array_equal(st.state2.absmax.numpy(), ours["absmax2"]), f"{rows}x{cols}: absmax2 differs"
            assert np.float32(st.offset.item()) == ours["offset"], f"{rows}x{cols}: offset differs"
            assert np.array_equal(st.state2.code.numpy(), DYN), "dynamic map differs"
            deq = F.dequantize_4bit(q, st).numpy().reshape(-1)
            err = np.abs(deq - ours["dequantized"]).max()
            print(f"{rows}x{cols}: bitsandbytes codes identical, dequantized max diff {err:.3g}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_fixture.json")
    with open(path, "w") as f:
        json.dump({"generator": "tests/data/make_quant_fixture.py", "cases": cases}, f)
    print("wrote", path)


if __name__ == "__main__":
    main()
