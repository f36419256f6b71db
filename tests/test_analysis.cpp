// lora/analysis.hpp: subspace similarity, amplification factor and the rank of dW, against references
// computed here from Eigen's SVD of the dense matrices (dW formed explicitly), over layers with a dense
// and a quantized base, and one test per refusal.
#include <lora/analysis.hpp>
#include <lora/quant/quant.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

using lora::Index;
using lora::LoraConfig;
using lora::LoraLinear;
using lora::Matrix;
using lora::Vector;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::random_matrix;
namespace analysis = lora::analysis;
namespace quant = lora::quant;

namespace {

// The first k right singular vectors of A from Eigen's full SVD.
Eigen::MatrixXd full_right_vectors(const Matrix<double>& A, Index k) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd(Eigen::MatrixXd(A), Eigen::ComputeFullV);
  return svd.matrixV().leftCols(k);
}

// phi(A1, A2, i, j) by the paper's definition (eq. 4).
double reference_phi(const Matrix<double>& A1, const Matrix<double>& A2, Index i, Index j) {
  const Eigen::MatrixXd V1 = full_right_vectors(A1, i), V2 = full_right_vectors(A2, j);
  return (V1.transpose() * V2).squaredNorm() / static_cast<double>(std::min(i, j));
}

// The analysis of dW = s B A formed as a dense out x in matrix, over its top-k singular vectors.
struct DenseReference {
  Vector<double> sigma;  // all min(out, in) singular values
  double delta_norm = 0, projection_norm = 0, factor = 0;
};

DenseReference dense_reference(const Matrix<double>& A, const Matrix<double>& B, double s, const Matrix<double>& W0,
                               Index k) {
  const Eigen::MatrixXd dW = s * B * A;
  Eigen::BDCSVD<Eigen::MatrixXd> svd(dW, Eigen::ComputeThinU | Eigen::ComputeThinV);
  DenseReference ref;
  ref.sigma = svd.singularValues();
  ref.delta_norm = dW.norm();
  ref.projection_norm = (svd.matrixU().leftCols(k).transpose() * W0 * svd.matrixV().leftCols(k)).norm();
  ref.factor = ref.delta_norm / ref.projection_norm;
  return ref;
}

double relative(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }

Matrix<double> random_orthogonal(Index n, unsigned seed) {
  const Eigen::MatrixXd Q = Eigen::HouseholderQR<Eigen::MatrixXd>(random_matrix<double>(n, n, seed)).householderQ();
  return Q;
}

}  // namespace

TEST_CASE("subspace_similarity: the paper's definition over Eigen's full SVD, symmetry, the grid", "[analysis]") {
  const Matrix<double> A1 = random_matrix<double>(4, 10, 11), A2 = random_matrix<double>(6, 10, 12);
  const Matrix<double> grid = analysis::subspace_similarity_grid(A1, A2);
  REQUIRE(grid.rows() == 4);
  REQUIRE(grid.cols() == 6);
  for (Index i = 1; i <= 4; ++i)
    for (Index j = 1; j <= 6; ++j) {
      INFO("i = " << i << ", j = " << j);
      const double phi = analysis::subspace_similarity(A1, A2, i, j);
      CHECK(std::abs(phi - reference_phi(A1, A2, i, j)) < 1e-12);
      CHECK(std::abs(analysis::subspace_similarity(A2, A1, j, i) - phi) < 1e-12);
      CHECK(std::abs(grid(i - 1, j - 1) - phi) < 1e-14);
      CHECK(phi >= 0);
      CHECK(phi <= 1);
    }
  // Random subspaces of R^10: a spread of values, not a constant.
  CHECK(grid.maxCoeff() - grid.minCoeff() > 0.2);
  // 4 + 6 = 10 = in: the 4-dim and the 6-dim subspaces of R^10 meet in general position, phi(4, 6) < 1.
  CHECK(grid(3, 5) < 0.99);

  // An adapter against itself: 1 on the diagonal.
  const Matrix<double> self = analysis::subspace_similarity_grid(A2, A2);
  for (Index i = 1; i <= 6; ++i) {
    CHECK(std::abs(analysis::subspace_similarity(A2, A2, i, i) - 1) < 1e-12);
    CHECK(std::abs(self(i - 1, i - 1) - 1) < 1e-12);
  }

  // r > in: min(r, in) directions, and the 12 x 5 adapter's span all of R^5.
  const Matrix<double> wide = random_matrix<double>(12, 5, 13), narrow = random_matrix<double>(3, 5, 14);
  const Matrix<double> edge = analysis::subspace_similarity_grid(wide, narrow);
  CHECK(edge.rows() == 5);
  CHECK(edge.cols() == 3);
  for (Index j = 1; j <= 3; ++j) {
    CHECK(std::abs(edge(4, j - 1) - 1) < 1e-12);
    CHECK(std::abs(edge(1, j - 1) - reference_phi(wide, narrow, 2, j)) < 1e-12);
  }
}

TEST_CASE("subspace_similarity: orthogonal row spaces give 0; the same row space gives 1", "[analysis]") {
  const Matrix<double> A1 = random_matrix<double>(3, 10, 21), A3 = random_matrix<double>(4, 10, 22);
  // A2's rows: random vectors projected onto the orthogonal complement of A1's row space.
  const Eigen::MatrixXd Q = Eigen::HouseholderQR<Eigen::MatrixXd>(A1.transpose()).householderQ();
  const Eigen::MatrixXd complement = Q.rightCols(7);
  const Matrix<double> A2 = random_matrix<double>(4, 10, 23) * complement * complement.transpose();
  const Matrix<double> orthogonal = analysis::subspace_similarity_grid(A1, A2);
  CHECK(orthogonal.cwiseAbs().maxCoeff() < 1e-12);
  CHECK(analysis::subspace_similarity(A1, A2, 3, 4) < 1e-12);

  // M A1, M invertible: the same row space, so phi(M A1, A1, 3, 3) = 1 and phi(., A3, 3, j) is unchanged.
  const Matrix<double> M = random_matrix<double>(3, 3, 24) + 3 * Matrix<double>::Identity(3, 3);
  REQUIRE(std::abs(M.determinant()) > 1);
  const Matrix<double> MA1 = M * A1;
  CHECK(std::abs(analysis::subspace_similarity(MA1, A1, 3, 3) - 1) < 1e-12);
  for (Index j = 1; j <= 4; ++j)
    CHECK(std::abs(analysis::subspace_similarity(MA1, A3, 3, j) - analysis::subspace_similarity(A1, A3, 3, j)) < 1e-12);
  // Q A1, Q orthogonal: the same right singular vectors, so every phi is unchanged.
  const Matrix<double> QA1 = random_orthogonal(3, 25) * A1;
  const Matrix<double> rotated = analysis::subspace_similarity_grid(QA1, A3), plain = analysis::subspace_similarity_grid(A1, A3);
  CHECK((rotated - plain).cwiseAbs().maxCoeff() < 1e-12);
  // A general M changes the singular vectors inside the row space: phi(1, 1) moves.
  CHECK(std::abs(analysis::subspace_similarity(MA1, A3, 1, 1) - plain(0, 0)) > 1e-6);
}

TEMPLATE_TEST_CASE("amplification_factor and delta_singular_values equal the dense dW's SVD", "[analysis]", float, double) {
  struct Shape {
    Index out, in, r;
  };
  // out != in both ways, r between out and in, and r > min(out, in) (dW has rank min(out, in) < r).
  const std::vector<Shape> shapes = {{9, 7, 3}, {5, 8, 3}, {3, 8, 5}, {9, 7, 12}};
  unsigned seed = 31;
  for (const Shape& sh : shapes) {
    INFO("out = " << sh.out << ", in = " << sh.in << ", r = " << sh.r);
    const Matrix<TestType> A = random_matrix<TestType>(sh.r, sh.in, seed++);
    const Matrix<TestType> B = random_matrix<TestType>(sh.out, sh.r, seed++);
    const Matrix<TestType> W0 = random_matrix<TestType>(sh.out, sh.in, seed++);
    const double s = 0.75;
    const Index k = std::min({sh.r, sh.out, sh.in});
    const DenseReference ref = dense_reference(A.template cast<double>(), B.template cast<double>(), s,
                                               W0.template cast<double>(), k);

    const Vector<double> sigma = analysis::delta_singular_values(A, B, s);
    REQUIRE(sigma.size() == k);
    CHECK((sigma - ref.sigma.head(k)).norm() < 1e-12 * ref.sigma(0));
    if (ref.sigma.size() > k) CHECK(ref.sigma.tail(ref.sigma.size() - k).maxCoeff() < 1e-12 * ref.sigma(0));
    CHECK(analysis::effective_rank(A, B, s) == k);
    if (sh.r > std::min(sh.out, sh.in)) CHECK(analysis::effective_rank(A, B, s) < sh.r);

    const analysis::Amplification amp = analysis::amplification_factor(A, B, s, W0);
    CHECK(amp.directions == k);
    CHECK(relative(amp.delta_norm, ref.delta_norm) < 1e-12);
    CHECK(relative(amp.projection_norm, ref.projection_norm) < 1e-10);
    CHECK(relative(amp.factor, ref.factor) < 1e-10);
    CHECK(relative(amp.base_norm, W0.template cast<double>().norm()) < 1e-12);
    // The scaling enters dW, not W0: the factor is linear in s.
    CHECK(relative(analysis::amplification_factor(A, B, -2 * s, W0).factor, 2 * ref.factor) < 1e-10);
  }
}

TEST_CASE("analysis over a LoraLinear: a dense base, a quantized base, the runtime scale, two adapters", "[analysis]") {
  // in = 4096: W0 is read in blocks of 8 rows, three blocks for out = 20.
  const Index out = 20, in = 4096;
  const Matrix<double> W = random_matrix<double>(out, in, 41);
  const Matrix<double> A = random_matrix<double>(4, in, 42), B = random_matrix<double>(out, 4, 43);
  LoraConfig config;
  config.rank = 4;
  config.alpha = 8;
  const double s = 2.0 * 0.5;  // alpha / r times the runtime scale

  LoraLinear<double> layer(W, config);
  layer.set_adapter_weights("default", A, B);
  layer.set_adapter_scale("default", 0.5);
  const analysis::Amplification amp = analysis::amplification_factor(layer, "default");
  const analysis::Amplification direct = analysis::amplification_factor(A, B, s, W);
  const DenseReference ref = dense_reference(A, B, s, W, 4);
  CHECK(amp.directions == 4);
  CHECK(relative(amp.factor, direct.factor) < 1e-12);
  CHECK(relative(amp.factor, ref.factor) < 1e-10);
  CHECK(relative(amp.projection_norm, ref.projection_norm) < 1e-10);
  CHECK(relative(amp.base_norm, W.norm()) < 1e-12);
  CHECK((analysis::delta_singular_values(layer, "default") - ref.sigma.head(4)).norm() < 1e-12 * ref.sigma(0));
  CHECK(analysis::effective_rank(layer, "default") == 4);
  CHECK(relative(analysis::entropy_effective_rank(layer, "default"), analysis::entropy_effective_rank(A, B, s)) < 1e-14);

  // Over NF4: the layer reads the dequantized W0 through dense_rows.
  const quant::QuantizedWeight q = quant::quantize_nf4(W);
  Matrix<float> Wq(out, in);
  q.dequantize_rows(0, q.out, Wq.data());
  LoraLinear<double> qlayer(quant::make_quantized_base<double>(q), config);
  qlayer.set_adapter_weights("default", A, B);
  qlayer.set_adapter_scale("default", 0.5);
  const analysis::Amplification qamp = analysis::amplification_factor(qlayer, "default");
  const analysis::Amplification qdirect = analysis::amplification_factor(A, B, s, Wq);
  const DenseReference qref = dense_reference(A, B, s, Wq.cast<double>(), 4);
  CHECK(relative(qamp.factor, qdirect.factor) < 1e-12);
  CHECK(relative(qamp.factor, qref.factor) < 1e-10);
  CHECK(relative(qamp.base_norm, Wq.cast<double>().norm()) < 1e-12);
  CHECK(relative(qamp.base_norm, W.norm()) > 1e-4);  // the quantized values were read, not W

  // Two adapters of one layer (and the same over two layers).
  LoraConfig other = config;
  other.rank = 6;
  layer.add_adapter("other", other);
  const Matrix<double> A6 = random_matrix<double>(6, in, 44);
  layer.set_adapter_weights("other", A6, random_matrix<double>(out, 6, 45));
  const Matrix<double> grid = analysis::subspace_similarity_grid(layer, "default", layer, "other");
  CHECK((grid - analysis::subspace_similarity_grid(A, A6)).cwiseAbs().maxCoeff() < 1e-14);
  CHECK(std::abs(analysis::subspace_similarity(layer, "default", qlayer, "default", 3, 4) - 1) < 1e-12);
  CHECK(std::abs(analysis::subspace_similarity(layer, "other", qlayer, "default", 2, 3) -
                 reference_phi(A6, A, 2, 3)) < 1e-12);

  // Float layer: the same numbers from the float values, computed in double.
  LoraLinear<float> flayer(W.cast<float>(), config);
  flayer.set_adapter_weights("default", A.cast<float>(), B.cast<float>());
  flayer.set_adapter_scale("default", 0.5);
  const DenseReference fref = dense_reference(A.cast<float>().cast<double>(), B.cast<float>().cast<double>(), s,
                                              W.cast<float>().cast<double>(), 4);
  CHECK(relative(analysis::amplification_factor(flayer, "default").factor, fref.factor) < 1e-10);
}

TEST_CASE("effective rank of a dW of known rank; the entropy effective rank", "[analysis]") {
  // B's five columns are three distinct ones (b0 b1 b0 b1 b2): dW = B A has rank 3 < r = 5.
  const Matrix<double> b = random_matrix<double>(8, 3, 51);
  Matrix<double> B(8, 5);
  B << b.col(0), b.col(1), b.col(0), b.col(1), b.col(2);
  const Matrix<double> A = random_matrix<double>(5, 10, 52), W0 = random_matrix<double>(8, 10, 53);
  const Vector<double> sigma = analysis::delta_singular_values(A, B, 1.5);
  REQUIRE(sigma.size() == 5);
  CHECK(sigma(2) > 1e-3 * sigma(0));
  CHECK(sigma.tail(2).maxCoeff() < 1e-12 * sigma(0));
  CHECK(analysis::effective_rank(A, B, 1.5) == 3);
  // The amplification uses the 3 determined directions, as the dense reference with k = 3.
  const analysis::Amplification amp = analysis::amplification_factor(A, B, 1.5, W0);
  const DenseReference ref = dense_reference(A, B, 1.5, W0, 3);
  CHECK(amp.directions == 3);
  CHECK(relative(amp.factor, ref.factor) < 1e-10);
  // Entropy rank from the dense singular values.
  const Vector<double> p = ref.sigma / ref.sigma.sum();
  double entropy = 0;
  for (Index k = 0; k < p.size(); ++k)
    if (p(k) > 1e-15) entropy -= p(k) * std::log(p(k));
  const double erank = analysis::entropy_effective_rank(A, B, 1.5);
  CHECK(relative(erank, std::exp(entropy)) < 1e-10);
  CHECK(erank >= 1);
  CHECK(erank <= 3);

  // Orthonormal B columns and A rows: three equal singular values (2), so both ranks are exactly 3.
  const Matrix<double> Bo = random_orthogonal(8, 54).leftCols(3), Ao = random_orthogonal(10, 55).topRows(3);
  const Vector<double> equal = analysis::delta_singular_values(Ao, Bo, 2.0);
  CHECK((equal - Vector<double>::Constant(3, 2.0)).cwiseAbs().maxCoeff() < 1e-12);
  CHECK(analysis::effective_rank(Ao, Bo, 2.0) == 3);
  CHECK(std::abs(analysis::entropy_effective_rank(Ao, Bo, 2.0) - 3) < 1e-12);
  // One dominant direction (singular values 200, 2, 2): the entropy rank drops near 1, the count stays
  // 3 unless tol is above 1 / 100.
  Matrix<double> Bd = Bo;
  Bd.col(0) *= 100;
  const double dominated = analysis::entropy_effective_rank(Ao, Bd, 2.0);
  CHECK(dominated > 1);
  CHECK(dominated < 1.2);
  CHECK(analysis::effective_rank(Ao, Bd, 2.0) == 3);
  CHECK(analysis::effective_rank(Ao, Bd, 2.0, 0.009) == 3);
  CHECK(analysis::effective_rank(Ao, Bd, 2.0, 0.011) == 1);

  // B = 0 (LoRA's initialization): dW = 0, rank 0.
  const Matrix<double> zero = Matrix<double>::Zero(8, 5);
  CHECK(analysis::delta_singular_values(A, zero, 1.0).cwiseAbs().maxCoeff() == 0);
  CHECK(analysis::effective_rank(A, zero, 1.0) == 0);
  CHECK(analysis::entropy_effective_rank(A, zero, 1.0) == 0);
}

TEST_CASE("analysis: bad input", "[analysis]") {
  const Matrix<double> A1 = random_matrix<double>(4, 10, 61), A2 = random_matrix<double>(6, 10, 62);
  const Matrix<double> A = random_matrix<double>(3, 7, 63), B = random_matrix<double>(9, 3, 64);
  const Matrix<double> W0 = random_matrix<double>(9, 7, 65);
  const double nan = std::numeric_limits<double>::quiet_NaN();

  CHECK(contains(message_of([&] { analysis::subspace_similarity(A1, random_matrix<double>(6, 12, 66), 1, 1); }),
                 "analysis::subspace_similarity: A1 has 10 columns and A2 has 12, expected both [r x in] over the same in_features"));
  CHECK(contains(message_of([&] { analysis::subspace_similarity(A1, A2, 0, 1); }),
                 "analysis::subspace_similarity: i = 0 is out of range, expected 1 <= i <= min(r1, in) = 4"));
  CHECK(contains(message_of([&] { analysis::subspace_similarity(A1, A2, 5, 1); }),
                 "analysis::subspace_similarity: i = 5 is out of range, expected 1 <= i <= min(r1, in) = 4"));
  CHECK(contains(message_of([&] { analysis::subspace_similarity(A1, A2, 1, 7); }),
                 "analysis::subspace_similarity: j = 7 is out of range, expected 1 <= j <= min(r2, in) = 6"));
  CHECK(contains(message_of([&] { analysis::subspace_similarity_grid(Matrix<double>(0, 10), A2); }),
                 "analysis::subspace_similarity_grid: A1 is empty (0 x 10)"));
  Matrix<double> bad = A2;
  bad(1, 2) = nan;
  CHECK(contains(message_of([&] { analysis::subspace_similarity_grid(A1, bad); }),
                 "analysis::subspace_similarity_grid: A2 contains NaN or Inf"));

  CHECK(contains(message_of([&] { analysis::amplification_factor(A, random_matrix<double>(9, 4, 67), 1.0, W0); }),
                 "analysis::amplification_factor: B has 4 columns and A has 3 rows, expected B [out x r] and A [r x in] with the same r"));
  CHECK(contains(message_of([&] { analysis::amplification_factor(A, B, 1.0, random_matrix<double>(7, 9, 68)); }),
                 "analysis::amplification_factor: W0 has shape 7 x 9, expected 9 x 7"));
  Matrix<double> badW = W0;
  badW(8, 6) = std::numeric_limits<double>::infinity();
  CHECK(contains(message_of([&] { analysis::amplification_factor(A, B, 1.0, badW); }),
                 "analysis::amplification_factor: W0 contains NaN or Inf"));
  CHECK(contains(message_of([&] { analysis::amplification_factor(A, B, nan, W0); }),
                 "analysis::amplification_factor: scaling must be finite, got nan"));
  CHECK(contains(message_of([&] { analysis::amplification_factor(A, Matrix<double>::Zero(9, 3), 1.0, W0); }),
                 "analysis::amplification_factor: dW = s B A is zero"));
  CHECK(contains(message_of([&] { analysis::amplification_factor(A, B, 1.0, W0, 1.0); }),
                 "analysis::amplification_factor: tol must be in (0, 1), got 1"));
  CHECK(contains(message_of([&] { analysis::delta_singular_values(Matrix<double>(3, 0), B, 1.0); }),
                 "analysis::delta_singular_values: A is empty (3 x 0)"));
  CHECK(contains(message_of([&] { analysis::effective_rank(A, B, 1.0, 0.0); }),
                 "analysis::effective_rank: tol must be in (0, 1), got 0"));
  CHECK(contains(message_of([&] { analysis::effective_rank(A, B, 1.0, nan); }),
                 "analysis::effective_rank: tol must be in (0, 1), got nan"));
  Matrix<double> badB = B;
  badB(0, 0) = nan;
  CHECK(contains(message_of([&] { analysis::entropy_effective_rank(A, badB, 1.0); }),
                 "analysis::entropy_effective_rank: B contains NaN or Inf"));

  // A merged layer's base holds W0 + dW: refused. Its A and B can still be read.
  LoraConfig config;
  config.rank = 3;
  LoraLinear<double> layer(W0, config);
  layer.set_adapter_weights("default", A, B);
  layer.merge();
  CHECK(contains(message_of([&] { analysis::amplification_factor(layer, "default"); }),
                 "analysis::amplification_factor: the layer is merged"));
  CHECK(analysis::effective_rank(layer, "default") == 3);
  CHECK(contains(message_of([&] { analysis::effective_rank(layer, "missing"); }), "missing"));
}

// ================================================================================================
// lora/text/wordpiece.hpp: the BERT WordPiece tokenizer ([tokenizer]), on a small hand-written
// vocabulary. The expected pieces are Hugging Face BertTokenizer's rules (tests/interop/tokenizer_check.cpp
// compares the ids with the real BertTokenizer on all-MiniLM-L6-v2's vocabulary, in scripts/interop.sh).
// ================================================================================================
#include <lora/text/wordpiece.hpp>

#include "temp_files.hpp"

namespace {

using lora::text::WordPieceTokenizer;
using Pieces = std::vector<std::string>;

const char* const tokenizer_vocab[] = {
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cafe", "un", "##aff", "##able", "play", "##ing", ",", "!",
    ".", "'", "s", "hello", "world", "中", "文", "x", "##x", "naive", "koln", "istanbul", "ο", "##δ", "##ο", "##σ",
    "¿", "—", "^", "[", "]", "sep", "Café", "привет", "한"};

lora::Index vocab_id(const std::string& token) {
  for (std::size_t i = 0; i < std::size(tokenizer_vocab); ++i)
    if (token == tokenizer_vocab[i]) return static_cast<lora::Index>(i);
  return -1;
}

std::string vocab_text(const std::string& newline = "\n") {
  std::string text;
  for (const char* token : tokenizer_vocab) text += std::string(token) + newline;
  return text;
}

// The message of the io_error that call() throws, or "(no exception)".
template <class Call>
std::string io_message_of(Call&& call) {
  try {
    call();
  } catch (const lora::io_error& e) {
    return e.what();
  }
  return "(no exception)";
}

}  // namespace

TEST_CASE("WordPieceTokenizer: vocabulary file, ids and special tokens", "[tokenizer]") {
  lora::testing::TempDir dir;
  lora::testing::write_file(dir / "vocab.txt", vocab_text());
  const auto tok = WordPieceTokenizer::from_file(dir / "vocab.txt");
  CHECK(tok.vocab_size() == static_cast<lora::Index>(std::size(tokenizer_vocab)));
  CHECK(tok.do_lower_case());
  CHECK(tok.pad_id() == 0);
  CHECK(tok.unk_id() == 1);
  CHECK(tok.cls_id() == 2);
  CHECK(tok.sep_id() == 3);
  CHECK(tok.mask_id() == 4);
  CHECK(tok.id("hello") == vocab_id("hello"));
  CHECK(tok.token(vocab_id("##aff")) == "##aff");
  CHECK(tok.id("not-a-token") == tok.unk_id());  // as convert_tokens_to_ids
  CHECK(tok.contains("world"));
  CHECK_FALSE(tok.contains("World"));

  CHECK(tok.tokenize("Hello, World!") == Pieces{"hello", ",", "world", "!"});
  CHECK(tok.encode("Hello, World!") ==
        std::vector<lora::Index>{2, vocab_id("hello"), vocab_id(","), vocab_id("world"), vocab_id("!"), 3});
  CHECK(tok.encode("Hello, World!", false) ==
        std::vector<lora::Index>{vocab_id("hello"), vocab_id(","), vocab_id("world"), vocab_id("!")});
  CHECK(tok.encode("") == std::vector<lora::Index>{2, 3});
  CHECK(tok.encode(" \t\n ", false).empty());

  // Lines may end with \r\n or \r (Python's text mode), and the last one needs no newline.
  std::string crlf = vocab_text("\r\n");
  crlf.resize(crlf.size() - 2);
  lora::testing::write_file(dir / "crlf.txt", crlf);
  const auto tok_crlf = WordPieceTokenizer::from_file(dir / "crlf.txt");
  CHECK(tok_crlf.vocab_size() == tok.vocab_size());
  CHECK(tok_crlf.id("한") == vocab_id("한"));
  lora::testing::write_file(dir / "cr.txt", vocab_text("\r"));
  CHECK(WordPieceTokenizer::from_file(dir / "cr.txt").id("the") == vocab_id("the"));
}

TEST_CASE("WordPieceTokenizer: BasicTokenizer's rules", "[tokenizer]") {
  std::vector<std::string> tokens(std::begin(tokenizer_vocab), std::end(tokenizer_vocab));
  const auto tok = WordPieceTokenizer::from_tokens(tokens);

  SECTION("accents are stripped after lower-casing, whatever the normalization of the input") {
    CHECK(tok.tokenize("Café") == Pieces{"cafe"});
    CHECK(tok.tokenize("CAFÉ") == Pieces{"cafe"});
    CHECK(tok.tokenize("Cafe\xCC\x81") == Pieces{"cafe"});  // e + U+0301 COMBINING ACUTE
    CHECK(tok.tokenize("NAÏVE Köln") == Pieces{"naive", "koln"});
    CHECK(tok.tokenize("İstanbul") == Pieces{"istanbul"});  // U+0130 lowers to i + U+0307, a mark
    CHECK(tok.basic_tokenize("Ärger Łódź") == Pieces{"arger", "łodz"});  // ł has no decomposition
    CHECK(tok.tokenize("ПРИВЕТ") == Pieces{"привет"});
    CHECK(tok.tokenize("\xCC\x81") == Pieces{});  // a word of marks only vanishes
    // Each character is lowered alone: Greek capital sigma is never the final form.
    CHECK(tok.tokenize("ΟΔΟΣ") == Pieces{"ο", "##δ", "##ο", "##σ"});
  }
  SECTION("word pieces, [UNK] and long words") {
    CHECK(tok.tokenize("unaffable playing") == Pieces{"un", "##aff", "##able", "play", "##ing"});
    CHECK(tok.tokenize("zzz") == Pieces{"[UNK]"});
    CHECK(tok.tokenize("unaffablezz the") == Pieces{"[UNK]", "the"});  // a word not covered is one [UNK]
    CHECK(tok.tokenize(std::string(100, 'x')).size() == 100);      // x ##x ... ##x
    CHECK(tok.tokenize(std::string(100, 'x')).back() == "##x");
    CHECK(tok.tokenize(std::string(101, 'x')) == Pieces{"[UNK]"});  // more than max_input_chars_per_word
    std::string accented;  // 101 code points, 202 bytes: the limit counts code points
    for (int i = 0; i < 101; ++i) accented += "\xC3\xA9";
    CHECK(tok.tokenize(accented) == Pieces{"[UNK]"});
    std::string hundred;
    for (int i = 0; i < 99; ++i) hundred += "x";
    CHECK(tok.basic_tokenize(hundred + "\xC3\x89") == Pieces{hundred + "e"});  // 100 code points
  }
  SECTION("punctuation, whitespace and control characters") {
    CHECK(tok.tokenize("the cafe's.") == Pieces{"the", "cafe", "'", "s", "."});
    CHECK(tok.tokenize("¿hello—world^") == Pieces{"¿", "hello", "—", "world", "^"});  // Po, Pd, ASCII Sk
    CHECK(tok.basic_tokenize("a$b+c") == Pieces{"a", "$", "b", "+", "c"});  // ASCII symbols count as punctuation
    CHECK(tok.basic_tokenize("a€b") == Pieces{"a€b"});                      // a Unicode symbol (Sc) does not
    CHECK(tok.tokenize("hel\x01lo wor\xE2\x80\x8B" "ld") == Pieces{"hello", "world"});  // Cc, U+200B (Cf) removed
    CHECK(tok.tokenize(std::string("hel\0lo", 6)) == Pieces{"hello"});
    CHECK(tok.tokenize("hel\xEF\xBF\xBDlo") == Pieces{"hello"});  // U+FFFD removed
    CHECK(tok.tokenize("\thello\xC2\xA0world\xE2\x80\xA8the\r\n") == Pieces{"hello", "world", "the"});  // NBSP, U+2028
  }
  SECTION("CJK ideographs are words of their own; Hangul syllables decompose into jamo when uncased") {
    CHECK(tok.tokenize("中文") == Pieces{"中", "文"});
    CHECK(tok.tokenize("hello中world") == Pieces{"hello", "中", "world"});
    // NFD (accent stripping) turns U+D55C into U+1112 U+1161 U+11AB, none a mark: the vocabulary's "한" is
    // not found, as in BertTokenizer.
    CHECK(tok.basic_tokenize("한") == Pieces{"\xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB"});
    CHECK(tok.tokenize("한") == Pieces{"[UNK]"});
  }
  SECTION("special tokens in the text stay whole, as written") {
    CHECK(tok.encode("hello [SEP] world[MASK]", false) ==
          std::vector<lora::Index>{vocab_id("hello"), 3, vocab_id("world"), 4});
    CHECK(tok.tokenize("[sep]") == Pieces{"[", "sep", "]"});
    CHECK(tok.tokenize("[SEP") == Pieces{"[", "sep"});  // lowered: not special
  }
  SECTION("a cased tokenizer keeps case and accents, in NFC") {
    const auto cased = WordPieceTokenizer::from_tokens(tokens, false);
    CHECK_FALSE(cased.do_lower_case());
    CHECK(cased.tokenize("Café") == Pieces{"Café"});
    CHECK(cased.tokenize("Cafe\xCC\x81") == Pieces{"Café"});  // composed by NFC
    CHECK(cased.tokenize("Hello cafe") == Pieces{"[UNK]", "cafe"});
    CHECK(cased.tokenize("\xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB") == Pieces{"한"});  // conjoining jamo compose
    CHECK(cased.tokenize("ΟΔΟΣ [SEP] [sep]") == Pieces{"[UNK]", "[SEP]", "[", "sep", "]"});
  }
}

TEST_CASE("WordPieceTokenizer: refusals", "[tokenizer]") {
  using lora::testing::contains;
  using lora::testing::message_of;
  std::vector<std::string> tokens(std::begin(tokenizer_vocab), std::end(tokenizer_vocab));
  const auto tok = WordPieceTokenizer::from_tokens(tokens);

  CHECK(message_of([&] { tok.encode("ab\xFF" "c"); }) ==
        "WordPieceTokenizer::encode: invalid UTF-8 at byte offset 2: byte 0xFF cannot start a character (overlong or "
        "beyond U+10FFFF)");
  CHECK(contains(message_of([&] { tok.tokenize("caf\xC3"); }),
                 "WordPieceTokenizer::tokenize: invalid UTF-8 at byte offset 3: the text ends inside the 2-byte sequence"));
  CHECK(contains(message_of([&] { tok.encode("x\xC3(y"); }),
                 "invalid UTF-8 at byte offset 1: byte 0x28 cannot follow 0xC3"));
  CHECK(contains(message_of([&] { tok.encode("\xED\xA0\x80"); }), "invalid UTF-8 at byte offset 0"));  // a surrogate
  CHECK(contains(message_of([&] { tok.encode("\xE0\x80\xAF"); }), "invalid UTF-8 at byte offset 0"));  // overlong
  CHECK(contains(message_of([&] { tok.encode("\xF4\x90\x80\x80"); }), "invalid UTF-8 at byte offset 0"));  // > U+10FFFF
  CHECK(contains(message_of([&] { tok.basic_tokenize("ok \x80"); }),
                 "invalid UTF-8 at byte offset 3: byte 0x80 is a continuation byte without a leading byte"));

  CHECK(message_of([&] { tok.token(tok.vocab_size()); }) ==
        "WordPieceTokenizer::token: id 39 is out of range, expected 0 <= id < vocab_size = 39");
  CHECK(contains(message_of([&] { tok.token(-1); }), "id -1 is out of range"));

  lora::testing::TempDir dir;
  CHECK(contains(io_message_of([&] { WordPieceTokenizer::from_file(dir / "missing.txt"); }),
                 "WordPieceTokenizer::from_file: " + (dir / "missing.txt") + ": cannot open"));
  lora::testing::write_file(dir / "dup.txt", "[PAD]\n[UNK]\nthe\n[CLS]\nthe\n[SEP]\n");
  CHECK(io_message_of([&] { WordPieceTokenizer::from_file(dir / "dup.txt"); }) ==
        "WordPieceTokenizer::from_file: " + (dir / "dup.txt") +
            ": line 5 (byte offset 22): token 'the' is a duplicate of line 3 (byte offset 12), expected every token once");
  lora::testing::write_file(dir / "nosep.txt", "[PAD]\n[UNK]\n[CLS]\nthe\n");
  CHECK(io_message_of([&] { WordPieceTokenizer::from_file(dir / "nosep.txt"); }) ==
        "WordPieceTokenizer::from_file: " + (dir / "nosep.txt") +
            ": the vocabulary (4 tokens) has no [SEP] token, expected [UNK], [CLS], [SEP] and [PAD]");
  lora::testing::write_file(dir / "nounk.txt", "[PAD]\n[CLS]\n[SEP]\n");
  CHECK(contains(io_message_of([&] { WordPieceTokenizer::from_file(dir / "nounk.txt"); }), "has no [UNK] token"));
  lora::testing::write_file(dir / "empty.txt", "");
  CHECK(contains(io_message_of([&] { WordPieceTokenizer::from_file(dir / "empty.txt"); }),
                 "the vocabulary (0 tokens) has no [UNK] token"));
  lora::testing::write_file(dir / "bad.txt", "[PAD]\n[UNK]\nca\xFF\n");
  CHECK(io_message_of([&] { WordPieceTokenizer::from_file(dir / "bad.txt"); }) ==
        "WordPieceTokenizer::from_file: " + (dir / "bad.txt") +
            ": line 3 (byte offset 12): invalid UTF-8 at byte 2 of the token: byte 0xFF cannot start a character "
            "(overlong or beyond U+10FFFF)");
  CHECK(vocab_id("한") >= 0);
  const auto no_mask = WordPieceTokenizer::from_tokens({"[PAD]", "[UNK]", "[CLS]", "[SEP]"});
  CHECK(no_mask.mask_id() == -1);
  CHECK(no_mask.tokenize("[MASK]") == Pieces{"[UNK]", "[UNK]", "[UNK]"});  // not special without a [MASK] token
  CHECK(message_of([&] { WordPieceTokenizer::from_tokens({"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[PAD]"}); }) ==
        "WordPieceTokenizer::from_tokens: token 4: token '[PAD]' is a duplicate of token 0, expected every token once");
}
