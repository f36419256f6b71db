// lora.hpp: a quantized frozen base (QLoRA): NF4 with optional double quantization, and int8.
//
// NF4 (QLoRA, bitsandbytes' bnb_4bit_quant_type="nf4"): W0 [out x in] is read row-major as one flat
// sequence, cut into blocks of `block_size` (64) weights; each block keeps absmax = max |w| and a 4-bit
// code per weight, the index of the nearest of the 16 NormalFloat levels to w / absmax (a value exactly on
// a midpoint takes the lower level, as bitsandbytes' decision tree does). Two codes per byte: the first
// element of a pair in the high nibble, the second in the low nibble (bitsandbytes' order). A tail block
// (total not a multiple of the block size) is shorter; an odd total leaves the last low nibble 0.
// Double quantization (bnb_4bit_use_double_quant): the float absmax values minus their mean (`offset`)
// are quantized to 8-bit codes in blocks of `absmax_block_size` (256), each with its own float absmax2,
// against bitsandbytes' signed dynamic map (its 256 float32 values); nearest value, ties to the lower code.
// Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (4.5 without double quantization).
// int8 (LLM.int8's vector-wise form, no outlier split): one absmax s per output row, q = rint(127 w / s)
// (round half to even), w' = q s / 127.
// Dequantization is in float: w' = level[code] * absmax, absmax = dyn[q] * absmax2 + offset.
#pragma once

#include <lora/base.hpp>
#include <lora/detail/kernels.hpp>
#include <lora/quant/decode.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace lora::quant {

enum class Format { nf4, int8 };

inline const char* format_name(Format f) { return f == Format::nf4 ? "nf4" : "int8"; }

// bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")).
inline const std::array<float, 16>& nf4_levels() {
  static const std::array<float, 16> t = {
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
      0.7229568362236023f, 1.0f};
  return t;
}

// bitsandbytes' signed 8-bit dynamic map as its nested (double) quantization uses it: the float32 values of
// QuantState.state2.code in bitsandbytes 0.47 (create_dynamic_map(signed=True), ascending, lowest entry -1).
inline const std::array<float, 256>& dynamic_map() {
  static const std::array<float, 256> t = {
      -1.0f, -0.9789062738418579f, -0.96484375f, -0.9507812261581421f, -0.936718761920929f, -0.922656238079071f,
      -0.9085937738418579f, -0.89453125f, -0.8804687261581421f, -0.866406261920929f, -0.852343738079071f, -0.8382812738418579f,
      -0.82421875f, -0.8101562261581421f, -0.796093761920929f, -0.782031238079071f, -0.7679687738418579f, -0.75390625f,
      -0.7398437261581421f, -0.725781261920929f, -0.7117187976837158f, -0.6976562738418579f, -0.68359375f, -0.6695312261581421f,
      -0.655468761920929f, -0.6414062976837158f, -0.6273437738418579f, -0.61328125f, -0.5992187261581421f, -0.585156261920929f,
      -0.5710937976837158f, -0.5570312738418579f, -0.54296875f, -0.5289062261581421f, -0.5148437023162842f, -0.500781238079071f,
      -0.48671871423721313f, -0.47265625f, -0.4585937261581421f, -0.44453126192092896f, -0.43046873807907104f, -0.4164062440395355f,
      -0.40234375f, -0.3882812261581421f, -0.37421876192092896f, -0.36015623807907104f, -0.3460937440395355f, -0.33203125f,
      -0.3179687261581421f, -0.30390626192092896f, -0.28984373807907104f, -0.2757812738418579f, -0.26171875f, -0.24765624105930328f,
      -0.23359374701976776f, -0.21953125298023224f, -0.20546874403953552f, -0.19140625f, -0.17734375596046448f, -0.16328124701976776f,
      -0.14921875298023224f, -0.13515624403953552f, -0.12109375f, -0.10703125596046448f, -0.09859374910593033f, -0.09578125923871994f,
      -0.09296875447034836f, -0.09015624970197678f, -0.08734375238418579f, -0.08453124761581421f, -0.08171875774860382f, -0.07890625298023224f,
      -0.07609374821186066f, -0.07328125089406967f, -0.07046874612569809f, -0.0676562562584877f, -0.06484375149011612f, -0.062031250447034836f,
      -0.05921875312924385f, -0.05640624836087227f, -0.053593751043081284f, -0.05078125f, -0.047968748956918716f, -0.04515625163912773f,
      -0.04234374687075615f, -0.039531249552965164f, -0.03671875223517418f, -0.033906251192092896f, -0.031093750149011612f, -0.028281250968575478f,
      -0.025468749925494194f, -0.02265625074505806f, -0.019843751564621925f, -0.017031250521540642f, -0.014218750409781933f, -0.011406250298023224f,
      -0.009718749672174454f, -0.009156249463558197f, -0.008593750186264515f, -0.008031249977648258f, -0.0074687497690320015f, -0.006906250026077032f,
      -0.006343749817460775f, -0.005781250074505806f, -0.0052187503315508366f, -0.0046562496572732925f, -0.004093749914318323f, -0.0035312497057020664f,
      -0.002968749962747097f, -0.002406249986961484f, -0.001843750011175871f, -0.001281249918974936f, -0.0009437500848434865f, -0.0008312499849125743f,
      -0.0007187500596046448f, -0.0006062500760890543f, -0.000493750034365803f, -0.0003812500217463821f, -0.0002687500382307917f, -0.00015625001105945557f,
      -8.874999912222847e-05f, -6.625000241911039e-05f, -4.374999844003469e-05f, -2.1249998098937795e-05f, -7.749999895168003e-06f, -3.250000190746505e-06f,
      -5.500000384017767e-07f, 0.0f, 5.500000384017767e-07f, 3.250000190746505e-06f, 7.749999895168003e-06f, 2.1249998098937795e-05f,
      4.374999844003469e-05f, 6.625000241911039e-05f, 8.874999912222847e-05f, 0.00015625001105945557f, 0.0002687500382307917f, 0.0003812500217463821f,
      0.000493750034365803f, 0.0006062500760890543f, 0.0007187500596046448f, 0.0008312499849125743f, 0.0009437500848434865f, 0.001281249918974936f,
      0.001843750011175871f, 0.002406249986961484f, 0.002968749962747097f, 0.0035312497057020664f, 0.004093749914318323f, 0.0046562496572732925f,
      0.0052187503315508366f, 0.005781250074505806f, 0.006343749817460775f, 0.006906250026077032f, 0.0074687497690320015f, 0.008031249977648258f,
      0.008593750186264515f, 0.009156249463558197f, 0.009718749672174454f, 0.011406250298023224f, 0.014218750409781933f, 0.017031250521540642f,
      0.019843751564621925f, 0.02265625074505806f, 0.025468749925494194f, 0.028281250968575478f, 0.031093750149011612f, 0.033906251192092896f,
      0.03671875223517418f, 0.039531249552965164f, 0.04234374687075615f, 0.04515625163912773f, 0.047968748956918716f, 0.05078125f,
      0.053593751043081284f, 0.05640624836087227f, 0.05921875312924385f, 0.062031250447034836f, 0.06484375149011612f, 0.0676562562584877f,
      0.07046874612569809f, 0.07328125089406967f, 0.07609374821186066f, 0.07890625298023224f, 0.08171875774860382f, 0.08453124761581421f,
      0.08734375238418579f, 0.09015624970197678f, 0.09296875447034836f, 0.09578125923871994f, 0.09859374910593033f, 0.10703125596046448f,
      0.12109375f, 0.13515624403953552f, 0.14921875298023224f, 0.16328124701976776f, 0.17734375596046448f, 0.19140625f,
      0.20546874403953552f, 0.21953125298023224f, 0.23359374701976776f, 0.24765624105930328f, 0.26171875f, 0.2757812738418579f,
      0.28984373807907104f, 0.30390626192092896f, 0.3179687261581421f, 0.33203125f, 0.3460937440395355f, 0.36015623807907104f,
      0.37421876192092896f, 0.3882812261581421f, 0.40234375f, 0.4164062440395355f, 0.43046873807907104f, 0.44453126192092896f,
      0.4585937261581421f, 0.47265625f, 0.48671871423721313f, 0.500781238079071f, 0.5148437023162842f, 0.5289062261581421f,
      0.54296875f, 0.5570312738418579f, 0.5710937976837158f, 0.585156261920929f, 0.5992187261581421f, 0.61328125f,
      0.6273437738418579f, 0.6414062976837158f, 0.655468761920929f, 0.6695312261581421f, 0.68359375f, 0.6976562738418579f,
      0.7117187976837158f, 0.725781261920929f, 0.7398437261581421f, 0.75390625f, 0.7679687738418579f, 0.782031238079071f,
      0.796093761920929f, 0.8101562261581421f, 0.82421875f, 0.8382812738418579f, 0.852343738079071f, 0.866406261920929f,
      0.8804687261581421f, 0.89453125f, 0.9085937738418579f, 0.922656238079071f, 0.936718761920929f, 0.9507812261581421f,
      0.96484375f, 0.9789062738418579f, 0.992968738079071f, 1.0f};
  return t;
}

// bitsandbytes' unsigned 8-bit dynamic map, the code of the second Adam moment in its 8-bit optimisers
// (create_dynamic_map(signed=False): for i = 0..6 the 2^(i+1) midpoints of linspace(0.1, 1, 2^(i+1) + 1)
// times 10^(i-6), then 0 and 1; ascending). The float32 values as torch 1.13's float32 linspace gives them
// (tests/data/make_adamw8bit_fixture.py); another torch may differ in the last bit of a few entries.
inline const std::array<float, 256>& dynamic_map_unsigned() {
  static const std::array<float, 256> t = {
      0.0f, 3.2500003044333425e-07f, 7.749999895168003e-07f, 2.1249998098937795e-06f, 4.374999662104528e-06f, 6.624999969062628e-06f,
      8.874999366526026e-06f, 1.5624998923158273e-05f, 2.6875000912696123e-05f, 3.8124999264255166e-05f, 4.937499761581421e-05f, 6.0625003243330866e-05f,
      7.187500159488991e-05f, 8.312499267049134e-05f, 9.4374998298008e-05f, 0.00012812500062864274f, 0.00018437500693835318f, 0.0002406249986961484f,
      0.00029687501955777407f, 0.0003531249822117388f, 0.0004093750030733645f, 0.00046562502393499017f, 0.0005218750447966158f, 0.0005781250074505806f,
      0.0006343750283122063f, 0.0006906250491738319f, 0.0007468750118277967f, 0.0008031250908970833f, 0.000859375053551048f, 0.0009156250162050128f,
      0.0009718750370666385f, 0.0011406249832361937f, 0.0014218749711290002f, 0.0017031249590218067f, 0.0019843748304992914f, 0.0022656249348074198f,
      0.0025468748062849045f, 0.002828124677762389f, 0.0031093747820705175f, 0.0033906246535480022f, 0.0036718749906867743f, 0.003953124862164259f,
      0.0042343745008111f, 0.004515625070780516f, 0.004796874709427357f, 0.005078124813735485f, 0.0053593749180436134f, 0.0056406245566904545f,
      0.00592187512665987f, 0.006203124299645424f, 0.0064843748696148396f, 0.006765625439584255f, 0.007046874612569809f, 0.007328125182539225f,
      0.007609374355524778f, 0.007890624925494194f, 0.008171874098479748f, 0.008453124202787876f, 0.008734375238418579f, 0.009015624411404133f,
      0.009296874515712261f, 0.009578123688697815f, 0.009859374724328518f, 0.010703125968575478f, 0.012109375558793545f, 0.013515624217689037f,
      0.014921875670552254f, 0.016328124329447746f, 0.017734374850988388f, 0.01914062537252903f, 0.020546874031424522f, 0.021953126415610313f,
      0.023359376937150955f, 0.024765625596046448f, 0.02617187611758709f, 0.02757812850177288f, 0.028984373435378075f, 0.030390625819563866f,
      0.03179687261581421f, 0.033203125f, 0.03460937365889549f, 0.036015626043081284f, 0.037421878427267075f, 0.03882812336087227f,
      0.04023437574505806f, 0.041640620678663254f, 0.043046873062849045f, 0.044453125447034836f, 0.04585937410593033f, 0.04726562649011612f,
      0.04867187887430191f, 0.050078123807907104f, 0.051484376192092896f, 0.05289062485098839f, 0.05429687723517418f, 0.05570312961935997f,
      0.05710938200354576f, 0.058515626937150955f, 0.05992187187075615f, 0.06132812425494194f, 0.06273438036441803f, 0.06414062529802322f,
      0.06554687768220901f, 0.0669531300663948f, 0.068359375f, 0.06976562738418579f, 0.07117187976837158f, 0.07257812470197678f,
      0.07398437708616257f, 0.07539062947034836f, 0.07679688185453415f, 0.07820312678813934f, 0.07960937172174454f, 0.08101562410593033f,
      0.08242187649011612f, 0.08382812142372131f, 0.0852343738079071f, 0.0866406187415123f, 0.08804687112569809f, 0.08945312350988388f,
      0.09085937589406967f, 0.09226562827825546f, 0.09367187321186066f, 0.09507812559604645f, 0.09648437798023224f, 0.09789062291383743f,
      0.09929687529802322f, 0.103515625f, 0.11054687201976776f, 0.11757812649011612f, 0.12460937350988388f, 0.13164061307907104f,
      0.138671875f, 0.14570313692092896f, 0.15273436903953552f, 0.15976563096046448f, 0.16679686307907104f, 0.173828125f,
      0.18085938692092896f, 0.18789061903953552f, 0.19492188096046448f, 0.20195311307907104f, 0.208984375f, 0.21601563692092896f,
      0.22304686903953552f, 0.23007813096046448f, 0.23710939288139343f, 0.244140625f, 0.25117188692092896f, 0.2582031190395355f,
      0.2652343809604645f, 0.27226564288139343f, 0.279296875f, 0.28632813692092896f, 0.2933593988418579f, 0.3003906309604645f,
      0.30742189288139343f, 0.314453125f, 0.32148438692092896f, 0.3285156190395355f, 0.3355468511581421f, 0.34257811307907104f,
      0.349609375f, 0.35664060711860657f, 0.3636718690395355f, 0.3707031011581421f, 0.37773436307907104f, 0.384765625f,
      0.39179688692092896f, 0.3988281190395355f, 0.4058593511581421f, 0.41289061307907104f, 0.419921875f, 0.42695310711860657f,
      0.4339843690395355f, 0.4410156309604645f, 0.44804686307907104f, 0.455078125f, 0.46210938692092896f, 0.4691406190395355f,
      0.4761718809604645f, 0.48320311307907104f, 0.490234375f, 0.49726560711860657f, 0.5042968988418579f, 0.5113281011581421f,
      0.5183593034744263f, 0.525390625f, 0.5324218273162842f, 0.5394531488418579f, 0.5464843511581421f, 0.5535156726837158f,
      0.560546875f, 0.567578136920929f, 0.5746093988418579f, 0.5816406011581421f, 0.5886719226837158f, 0.595703125f,
      0.602734386920929f, 0.6097656488418579f, 0.6167968511581421f, 0.623828113079071f, 0.630859375f, 0.6378905773162842f,
      0.6449218988418579f, 0.6519531011581421f, 0.6589844226837158f, 0.666015625f, 0.6730469465255737f, 0.6800781488418579f,
      0.6871093511581421f, 0.6941406726837158f, 0.701171875f, 0.7082031965255737f, 0.7152343988418579f, 0.7222656011581421f,
      0.7292969226837158f, 0.736328125f, 0.7433593273162842f, 0.7503906488418579f, 0.7574218511581421f, 0.7644531726837158f,
      0.771484375f, 0.7785155773162842f, 0.7855468988418579f, 0.7925781011581421f, 0.7996093034744263f, 0.806640625f,
      0.8136718273162842f, 0.8207031488418579f, 0.8277343511581421f, 0.8347656726837158f, 0.841796875f, 0.848828136920929f,
      0.8558593988418579f, 0.8628906011581421f, 0.8699219226837158f, 0.876953125f, 0.883984386920929f, 0.8910156488418579f,
      0.8980468511581421f, 0.905078113079071f, 0.912109375f, 0.9191405773162842f, 0.9261718988418579f, 0.9332031011581421f,
      0.9402344226837158f, 0.947265625f, 0.9542969465255737f, 0.9613281488418579f, 0.9683593511581421f, 0.9753906726837158f,
      0.982421875f, 0.9894531965255737f, 0.9964843988418579f, 1.0f};
  return t;
}

namespace detail {

inline std::uint8_t nf4_code(float x) {
  const auto& t = nf4_levels();
  int c = 0;
  for (int k = 0; k < 15; ++k)
    if (static_cast<double>(x) > (static_cast<double>(t[k]) + static_cast<double>(t[k + 1])) / 2.0) c = k + 1;
  return static_cast<std::uint8_t>(c);
}

// The index of the entry of the ascending table `t` nearest to x; ties take the lower index.
inline std::uint8_t nearest_code(const std::array<float, 256>& t, float x) {
  const auto it = std::lower_bound(t.begin(), t.end(), x);
  if (it == t.begin()) return 0;
  if (it == t.end()) return 255;
  const std::size_t hi = static_cast<std::size_t>(it - t.begin()), lo = hi - 1;
  return static_cast<std::uint8_t>(std::abs(x - t[hi]) < std::abs(x - t[lo]) ? hi : lo);
}

inline std::uint8_t dynamic_code(float x) { return nearest_code(dynamic_map(), x); }
inline std::uint8_t dynamic_code_unsigned(float x) { return nearest_code(dynamic_map_unsigned(), x); }

// Absmax block quantization of value(i), i < n: per block of `block` values, absmax = max |value|, and
// emit(i, code(value(i) * (1 / absmax))) (0 for an all-zero block). Returns the absmax of each block.
template <class Value, class Code, class Emit>
std::vector<float> quantize_blocks(Index n, Index block, Value value, Code code, Emit emit) {
  std::vector<float> absmax(static_cast<std::size_t>((n + block - 1) / block));
  for (Index b = 0; b * block < n; ++b) {
    const Index i0 = b * block, i1 = std::min(n, i0 + block);
    float m = 0;
    for (Index i = i0; i < i1; ++i) m = std::max(m, std::abs(value(i)));
    absmax[static_cast<std::size_t>(b)] = m;
    const float inv = m > 0 ? 1.0f / m : 0.0f;
    for (Index i = i0; i < i1; ++i) emit(i, code(value(i) * inv));
  }
  return absmax;
}

}  // namespace detail

struct Nf4Options {
  Index block_size = 64;          // weights per absmax (even, >= 2)
  bool double_quant = true;       // quantize the absmax values to 8 bits
  Index absmax_block_size = 256;  // absmax values per absmax2
};

// The quantized values of one W0 [out x in]; the fields are what a file stores.
struct QuantizedWeight {
  Format format = Format::nf4;
  Index out = 0, in = 0;
  Nf4Options options;
  std::vector<std::uint8_t> codes;  // nf4: ceil(out*in/2) bytes; int8: out*in bytes (int8 as two's complement)
  std::vector<float> absmax;        // nf4 without double quant: one per block; int8: one per row
  std::vector<std::uint8_t> qabsmax;  // nf4 with double quant: one code per block
  std::vector<float> absmax2;         // nf4 with double quant: one per absmax block
  float offset = 0;                   // nf4 with double quant: mean of the absmax values

  Index blocks() const { return (out * in + options.block_size - 1) / options.block_size; }
  // absmax of NF4 block b, as dequantization uses it.
  float block_absmax(Index b) const { return scales().at(b); }
  // The block scales as the decode kernels read them (quant/decode.hpp).
  kernel::Nf4Scales scales() const {
    kernel::Nf4Scales s;
    if (!options.double_quant) {
      s.absmax = absmax.data();
      return s;
    }
    s.qabsmax = qabsmax.data();
    s.dyn = dynamic_map().data();
    s.absmax2 = absmax2.data();
    s.group = options.absmax_block_size;
    s.offset = offset;
    return s;
  }
  // Rows [first, first + count) dequantized (float) into dst (count x in, row-major).
  template <class T>
  void dequantize_rows(Index first, Index count, T* dst) const {
    if (format == Format::int8) {
      for (Index r = first; r < first + count; ++r, dst += in) dequantize(r, 0, in, dst);
    } else {
      kernel::nf4_decode(codes.data(), first * in, count * in, options.block_size, nf4_levels().data(), scales(), dst);
    }
  }
  // W0(r, c0 .. c0 + len) dequantized (float) into dst[0 .. len); the caller keeps it inside row r.
  template <class T>
  void dequantize(Index r, Index c0, Index len, T* dst) const {
    if (format == Format::int8)
      kernel::int8_decode(reinterpret_cast<const std::int8_t*>(codes.data()) + r * in + c0, len,
                          absmax[static_cast<std::size_t>(r)] / 127.0f, dst);
    else
      kernel::nf4_decode(codes.data(), r * in + c0, len, options.block_size, nf4_levels().data(), scales(), dst);
  }
  std::size_t bytes() const {
    return codes.size() + absmax.size() * 4 + qabsmax.size() + absmax2.size() * 4 +
           (format == Format::nf4 && options.double_quant ? 4 : 0);
  }
};

template <class Derived>
QuantizedWeight quantize_nf4(const Eigen::MatrixBase<Derived>& W, const Nf4Options& options = {}) {
  if (options.block_size < 2 || options.block_size % 2 != 0)
    lora::detail::fail("quantize_nf4", "block_size must be even and >= 2, got ", options.block_size);
  if (options.double_quant && options.absmax_block_size < 1)
    lora::detail::fail("quantize_nf4", "absmax_block_size must be >= 1, got ", options.absmax_block_size);
  if (W.rows() == 0 || W.cols() == 0) lora::detail::fail("quantize_nf4", "W0 is empty (", W.rows(), " x ", W.cols(), ")");
  lora::detail::require_finite("quantize_nf4", "W0", W);
  QuantizedWeight q;
  q.format = Format::nf4;
  q.out = W.rows();
  q.in = W.cols();
  q.options = options;
  const Index total = q.out * q.in, nb = q.blocks();
  auto at = [&](Index i) { return static_cast<float>(W(i / q.in, i % q.in)); };
  q.codes.assign(static_cast<std::size_t>((total + 1) / 2), 0);
  std::vector<float> am = detail::quantize_blocks(total, options.block_size, at, detail::nf4_code, [&](Index i, std::uint8_t c) {
    q.codes[static_cast<std::size_t>(i / 2)] |= static_cast<std::uint8_t>((i & 1) ? c : (c << 4));
  });
  if (!options.double_quant) {
    q.absmax = std::move(am);
    return q;
  }
  double sum = 0;
  for (float a : am) sum += a;
  q.offset = static_cast<float>(sum / static_cast<double>(nb));
  q.qabsmax.resize(static_cast<std::size_t>(nb));
  q.absmax2 = detail::quantize_blocks(
      nb, options.absmax_block_size, [&](Index j) { return am[static_cast<std::size_t>(j)] - q.offset; },
      detail::dynamic_code, [&](Index j, std::uint8_t c) { q.qabsmax[static_cast<std::size_t>(j)] = c; });
  return q;
}

template <class Derived>
QuantizedWeight quantize_int8(const Eigen::MatrixBase<Derived>& W) {
  if (W.rows() == 0 || W.cols() == 0) lora::detail::fail("quantize_int8", "W0 is empty (", W.rows(), " x ", W.cols(), ")");
  lora::detail::require_finite("quantize_int8", "W0", W);
  QuantizedWeight q;
  q.format = Format::int8;
  q.out = W.rows();
  q.in = W.cols();
  q.codes.resize(static_cast<std::size_t>(q.out * q.in));
  q.absmax.resize(static_cast<std::size_t>(q.out));
  for (Index r = 0; r < q.out; ++r) {
    float m = 0;
    for (Index j = 0; j < q.in; ++j) m = std::max(m, std::abs(static_cast<float>(W(r, j))));
    q.absmax[static_cast<std::size_t>(r)] = m;
    const float scale = m > 0 ? 127.0f / m : 0.0f;
    for (Index j = 0; j < q.in; ++j) {
      const float v = std::nearbyint(static_cast<float>(W(r, j)) * scale);
      q.codes[static_cast<std::size_t>(r * q.in + j)] = static_cast<std::uint8_t>(static_cast<std::int8_t>(v));
    }
  }
  return q;
}

// A frozen base stored quantized. The products (n > 8: training, prefill) run the library's packed GEMM
// with W0 dequantized block by block straight into its packed panels (KC x NC values at a time, per
// thread): nothing of W0's full size is ever made dense, and they scale over the threads as the dense
// base's do. n <= 8 (decoding): a fused pass that reads each code once and accumulates in float.
template <class Scalar>
class QuantizedBase final : public FrozenBase<Scalar> {
 public:
  explicit QuantizedBase(QuantizedWeight q, Vector<Scalar> bias = Vector<Scalar>())
      : FrozenBase<Scalar>(q.out, q.in, nullptr), q_(std::move(q)), bias_(std::move(bias)) {
    if (bias_.size() > 0) {
      if (bias_.size() != q_.out)
        lora::detail::fail("QuantizedBase", "bias has ", bias_.size(), " entries, expected out_features = ", q_.out);
      lora::detail::require_finite("QuantizedBase", "bias", bias_);
      this->set_bias_pointer(bias_.data());
    }
    float m = 0;
    if (q_.format == Format::int8) {
      for (float a : q_.absmax) m = std::max(m, a);
    } else {
      for (Index b = 0; b < q_.blocks(); ++b) m = std::max(m, std::abs(q_.block_absmax(b)));
    }
    max_abs_ = static_cast<Scalar>(m);
  }

  const QuantizedWeight& weight() const { return q_; }

  void forward(const Scalar* X, Index n, Scalar* Y, BaseWorkspace<Scalar>& work, bool add_bias) const override {
    const Index in = this->in_features(), out = this->out_features();
    if (n <= small_batch) {
      fused_forward(X, n, Y, work);
    } else {
      lora::detail::packed_gemm_parallel(work.forward, lora::detail::row_major_operands(n, out, in, X, Y),
                                         [&](Index pc, Index kc, Index jc, Index nc, Scalar* dst) {
                                           pack_transposed(pc, kc, jc, nc, dst);
                                         });
    }
    if (add_bias && this->has_bias()) Eigen::Map<Matrix<Scalar>>(Y, n, out).rowwise() += this->bias().transpose();
  }

  // The fused LoRA forward (FrozenBase::forward_low_rank) through the same decoding packer: n > 8.
  bool forward_low_rank(const Scalar* X, Index n, Scalar* Y, const lora::detail::GemmLowRank<Scalar>& low,
                        BaseWorkspace<Scalar>& work) const override {
    if (n <= small_batch) return false;
    lora::detail::packed_gemm_parallel(
        work.forward, lora::detail::row_major_operands(n, this->out_features(), this->in_features(), X, Y),
        [&](Index pc, Index kc, Index jc, Index nc, Scalar* dst) { pack_transposed(pc, kc, jc, nc, dst); }, &low);
    return true;
  }

  void backward_input(const Scalar* dY, Index n, Scalar* dX, BaseWorkspace<Scalar>& work) const override {
    lora::detail::packed_gemm_parallel(work.backward, lora::detail::row_major_operands(n, this->in_features(), this->out_features(), dY, dX),
                                       [&](Index pc, Index kc, Index jc, Index nc, Scalar* dst) {
                                         pack_rows(pc, kc, jc, nc, dst);
                                       });
  }
  // dX = dY W0 + T V (FrozenBase::backward_input_low_rank) through the same decoding packer.
  bool backward_input_low_rank(const Scalar* dY, Index n, Scalar* dX, const lora::detail::GemmLowRank<Scalar>& low,
                               BaseWorkspace<Scalar>& work) const override {
    lora::detail::packed_gemm_parallel(
        work.backward, lora::detail::row_major_operands(n, this->in_features(), this->out_features(), dY, dX),
        [&](Index pc, Index kc, Index jc, Index nc, Scalar* dst) { pack_rows(pc, kc, jc, nc, dst); }, &low);
    return true;
  }

  void dense_rows(Index first, Index count, Scalar* dst) const override { q_.dequantize_rows(first, count, dst); }
  const Scalar* dense_weight() const override { return nullptr; }
  Scalar max_abs() const override { return max_abs_; }
  std::size_t owned_bytes() const override {
    return q_.bytes() + static_cast<std::size_t>(bias_.size()) * sizeof(Scalar);
  }
  std::string describe() const override {
    return lora::detail::concat("QuantizedBase(", format_name(q_.format), q_.options.double_quant && q_.format == Format::nf4 ? "+dq, " : ", ",
                                this->in_features(), " -> ", this->out_features(), this->has_bias() ? ", bias)" : ")");
  }

 private:
  static constexpr Index small_batch = 8;
  static constexpr Index NR = lora::detail::GemmBlocking<Scalar>::NR;

  // The forward's B = W0^T, block (pc, kc, jc, nc) into NR-column panels at dst: B(p, j) = W0(j, p), so a
  // panel's NR columns are NR rows of W0, decoded a chunk at a time.
  void pack_transposed(Index pc, Index kc, Index jc, Index nc, Scalar* dst) const {
    for (Index q = 0; q < nc; q += NR, dst += NR * kc) {
      for (Index c = 0; c < NR; ++c) {
        if (q + c >= nc) {
          for (Index p = 0; p < kc; ++p) dst[p * NR + c] = Scalar(0);
          continue;
        }
        Scalar chunk[pack_chunk];
        for (Index p0 = 0; p0 < kc; p0 += pack_chunk) {
          const Index len = std::min(pack_chunk, kc - p0);
          q_.dequantize(jc + q + c, pc + p0, len, chunk);
          for (Index p = 0; p < len; ++p) dst[(p0 + p) * NR + c] = chunk[p];
        }
      }
    }
  }

  // The backward's B = W0, block (pc, kc, jc, nc) into NR-column panels at dst: a panel's row p holds NR
  // consecutive weights of W0's row pc + p.
  void pack_rows(Index pc, Index kc, Index jc, Index nc, Scalar* dst) const {
    Scalar chunk[pack_chunk];
    for (Index p = 0; p < kc; ++p) {
      for (Index j0 = 0; j0 < nc; j0 += pack_chunk) {
        const Index len = std::min(pack_chunk, nc - j0);
        q_.dequantize(pc + p, jc + j0, len, chunk);
        for (Index q = 0; q < len; q += NR) {
          Scalar* panel = dst + (j0 + q) * kc + p * NR;
          const Index cols = std::min(NR, len - q);
          std::copy(chunk + q, chunk + q + cols, panel);
          std::fill(panel + cols, panel + NR, Scalar(0));
        }
      }
    }
  }

  // Weights dequantized per call while packing (a multiple of NR, on the stack).
  static constexpr Index pack_chunk = 8 * NR;

  void fused_forward(const Scalar* X, Index n, Scalar* Y, BaseWorkspace<Scalar>& work) const {
    const Index in = this->in_features(), out = this->out_features();
    const double flops = static_cast<double>(n) * static_cast<double>(in) * static_cast<double>(out);
    const Scalar* Xp = nullptr;  // X in kernel::pair_layout, for the NF4 path that decodes without shuffles
    if constexpr (std::is_same_v<Scalar, float>) {
      if (q_.format == Format::nf4 && kernel::pairs_fit(in, q_.options.block_size)) {
        auto& xp = work.decode_x;
        if (xp.rows() < small_batch || xp.cols() != in) xp.resize(small_batch, in);
        for (Index k = 0; k < n; ++k) kernel::pair_layout(X + k * in, in, xp.data() + k * in);
        Xp = xp.data();
      }
    }
    lora::detail::parallel_for(out, 1, lora::detail::threads_for(flops), [&](Index r0, Index r1) {
      Scalar acc[small_batch];
      for (Index r = r0; r < r1; ++r) {
        for (Index k = 0; k < n; ++k) acc[k] = 0;
        row_dot(r, X, Xp, n, acc);
        for (Index k = 0; k < n; ++k) Y[k * out + r] = static_cast<Scalar>(acc[k]);
      }
    });
  }

  // acc[k] = sum_j X[k, j] W0[r, j], reading row r's codes once; accumulated in Scalar (float for a float
  // model), so a double model's products are exact up to double rounding.
  // Xp: X in kernel::pair_layout (float NF4 rows that kernel::pairs_fit), else nullptr.
  void row_dot(Index r, const Scalar* X, const Scalar* Xp, Index n, Scalar* acc) const {
    const Index in = this->in_features();
    if constexpr (std::is_same_v<Scalar, float>) {  // the SIMD decode (quant/decode.hpp)
      kernel::with_rows(n, [&](auto rows) {
        constexpr int N = decltype(rows)::value;
        if (Xp)
          kernel::nf4_dot_pairs<N>(q_.codes.data(), r * in, in, q_.options.block_size, nf4_levels().data(), q_.scales(),
                                   Xp, in, acc);
        else if (q_.format == Format::int8)
          kernel::int8_dot<N>(reinterpret_cast<const std::int8_t*>(q_.codes.data()) + r * in, in,
                              q_.absmax[static_cast<std::size_t>(r)] / 127.0f, X, in, acc);
        else
          kernel::nf4_dot<N>(q_.codes.data(), r * in, in, q_.options.block_size, nf4_levels().data(), q_.scales(), X, in,
                             acc);
      });
      return;
    }
    if (q_.format == Format::int8) {
      const std::int8_t* c = reinterpret_cast<const std::int8_t*>(q_.codes.data()) + r * in;
      for (Index k = 0; k < n; ++k) {
        const Scalar* x = X + k * in;
        const float scale = q_.absmax[static_cast<std::size_t>(r)] / 127.0f;
        Scalar s = 0;
        for (Index j = 0; j < in; ++j) s += static_cast<Scalar>(static_cast<float>(c[j]) * scale) * x[j];
        acc[k] = s;
      }
      return;
    }
    // The weights exactly as dequantize_rows makes them (float products), so every path multiplies by the
    // same W0.
    kernel::nf4_each(q_.codes.data(), r * in, in, q_.options.block_size, nf4_levels().data(), q_.scales(),
                     [&](Index j, float w) {
                       const Scalar ws = static_cast<Scalar>(w);
                       for (Index k = 0; k < n; ++k) acc[k] += ws * X[k * in + j];
                     });
  }

  QuantizedWeight q_;
  Vector<Scalar> bias_;
  Scalar max_abs_ = 0;
};

template <class Scalar>
std::shared_ptr<const QuantizedBase<Scalar>> make_quantized_base(QuantizedWeight q,
                                                                 Vector<Scalar> bias = Vector<Scalar>()) {
  return std::make_shared<QuantizedBase<Scalar>>(std::move(q), std::move(bias));
}

}  // namespace lora::quant
