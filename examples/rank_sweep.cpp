// Rank versus parameters: LoRA of rank r in {1, 2, 4, 8, 16, 32, 64} on the classifier of
// finetune_classifier, against head-only and full fine-tuning, then the analytic parameter counts of LoRA
// on transformer shapes. Writes the measured sweep as CSV; bench/plot_rank_sweep.sh draws it. Then the
// LoRA paper's analysis (Section 7, lora/analysis.hpp) of the adapters on layers.2 (1024 x 1024): the
// subspace similarity of r = 8 and r = 64 (and of two r = 8 runs from different seeds), the amplification
// factor and the rank of dW at every r.
//   rank_sweep [--csv rank_sweep.csv] [--threads N]
#include "classifier_common.hpp"

#include <lora/analysis.hpp>

#include <unistd.h>

#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace example;

namespace {

// Per transformer block of width d with an MLP of 4d: q, k, v, o are d x d, the MLP d x 4d and 4d x d.
void print_transformer_counts() {
  std::printf("\nAnalytic counts on transformer shapes (per block; MLP width 4d):\n");
  std::printf("| d | r | one d x d matrix: LoRA / dense | q, v only: LoRA / block | all linear: LoRA / block |\n"
              "|---:|---:|---:|---:|---:|\n");
  for (const lora::Index d : {768, 1024, 4096}) {
    const lora::Index block = 4 * d * d + 2 * 4 * d * d;  // attention 4 d^2, MLP 8 d^2 (weights only)
    for (const lora::Index r : {1, 4, 8, 16, 64}) {
      const lora::Index one = lora::nn::lora_parameter_count(d, d, r);
      const lora::Index qv = 2 * one;
      const lora::Index all = 4 * one + lora::nn::lora_parameter_count(d, 4 * d, r) +
                              lora::nn::lora_parameter_count(4 * d, d, r);
      std::printf("| %ld | %ld | %s / %s (%.3f %%) | %s (%.3f %%) | %s (%.3f %%) |\n", static_cast<long>(d),
                  static_cast<long>(r), lora::nn::with_thousands(one).c_str(), lora::nn::with_thousands(d * d).c_str(),
                  100.0 * static_cast<double>(one) / static_cast<double>(d * d), lora::nn::with_thousands(qv).c_str(),
                  100.0 * static_cast<double>(qv) / static_cast<double>(block), lora::nn::with_thousands(all).c_str(),
                  100.0 * static_cast<double>(all) / static_cast<double>(block));
    }
  }
}

// Writes `text` to `path` atomically: a temporary file in the same directory, flushed and synced, renamed.
void write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw std::runtime_error("rank_sweep: cannot write " + tmp);
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0 &&
                  ::fsync(fileno(f)) == 0;
  if (std::fclose(f) != 0 || !ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("rank_sweep: writing " + path + " failed");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path = "rank_sweep.csv";
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--csv") csv_path = argv[i + 1];
  const auto program_start = std::chrono::steady_clock::now();
  const int threads = threads_from_args(argc, argv);
  const Setup setup = make_setup();
  Model base = make_base();
  const lora::Index base_params = base.num_parameters();
  std::printf("Pretraining the base MLP (%s parameters) on task A (Eigen threads: %d)...\n",
              lora::nn::with_thousands(base_params).c_str(), threads);
  const RunResult pre =
      train_and_evaluate("pretrain", base, base_params, setup.a_train, kPretrainEpochs, kLrFull, setup, false);
  std::printf("Base: accuracy %.3f on A, %.3f on B. Fine-tuning on B, %d epochs each:\n", pre.accuracy_a,
              pre.accuracy_b, kFinetuneEpochs);

  struct Row {
    std::string method;
    int rank;
    RunResult result;
  };
  std::vector<Row> rows;
  struct Analysis {
    int rank;
    lora::analysis::Amplification amp;
    lora::Index numerical_rank;
    double entropy_rank;
  };
  std::vector<Analysis> analyses;
  lora::Matrix<double> A8, A64;  // layers.2's trained lora_A at r = 8 and r = 64
  {
    Model frozen = base;
    freeze_all_but(frozen, "");
    rows.push_back({"frozen", -1, train_and_evaluate("frozen", frozen, base_params, setup.b_train, 0, kLrFull, setup, false)});
  }
  {
    Model head = base;
    freeze_all_but(head, "layers.4");
    rows.push_back({"head", 0, train_and_evaluate("head", head, base_params, setup.b_train, kFinetuneEpochs, kLrHead, setup, false)});
  }
  for (const int r : {1, 2, 4, 8, 16, 32, 64}) {
    Model model = base;
    lora::nn::inject_lora(model, lora_config(r));
    const std::string name = "lora r=" + std::to_string(r);
    rows.push_back({"lora", r, train_and_evaluate(name, model, base_params, setup.b_train, kFinetuneEpochs, kLrLora, setup, false)});
    const lora::LoraLinear<Scalar>& hidden = *model.lora_layers()[1].second;  // layers.2
    analyses.push_back({r, lora::analysis::amplification_factor(hidden, "default"),
                        lora::analysis::effective_rank(hidden, "default"),
                        lora::analysis::entropy_effective_rank(hidden, "default")});
    if (r == 8) A8 = hidden.A().cast<double>();
    if (r == 64) A64 = hidden.A().cast<double>();
    std::printf("  %-10s %8s trainable (%5.2f %%)  accuracy on B %.3f  %.2f s/epoch\n", name.c_str(),
                lora::nn::with_thousands(rows.back().result.trainable).c_str(), rows.back().result.percent_of_base,
                rows.back().result.accuracy_b, rows.back().result.seconds_per_epoch);
    std::fflush(stdout);
  }
  {
    Model full = base;
    rows.push_back({"full", -1, train_and_evaluate("full", full, base_params, setup.b_train, kFinetuneEpochs, kLrFull, setup, false)});
  }

  const double frozen_acc = rows.front().result.accuracy_b, full_acc = rows.back().result.accuracy_b;
  std::printf("\n| method | r | trainable params | %% of base | accuracy on B | share of full FT's gain | s / epoch |\n"
              "|---|---:|---:|---:|---:|---:|---:|\n");
  std::ostringstream csv;
  csv << "method,rank,trainable_params,percent_of_base,accuracy_b,gain_share,seconds_per_epoch\n";
  for (const Row& row : rows) {
    const RunResult& r = row.result;
    const double share = (r.accuracy_b - frozen_acc) / (full_acc - frozen_acc);
    std::printf("| %s | %s | %s | %.2f %% | %.3f | %.1f %% | %.2f |\n", row.method.c_str(),
                row.rank > 0 ? std::to_string(row.rank).c_str() : "-", lora::nn::with_thousands(r.trainable).c_str(),
                r.percent_of_base, r.accuracy_b, 100 * share, r.seconds_per_epoch);
    csv << row.method << ',' << row.rank << ',' << r.trainable << ',' << r.percent_of_base << ',' << r.accuracy_b
        << ',' << share << ',' << r.seconds_per_epoch << '\n';
  }
  write_atomically(csv_path, csv.str());
  std::printf("\nWrote %s.\n", csv_path.c_str());

  // ---- the paper's analysis of layers.2 -------------------------------------------------------------
  // A second r = 8 run whose A starts from another seed: every rank above draws A from seed 5, so the
  // first 8 rows of A at r = 64 may start equal to A at r = 8, and their similarity then partly shows the
  // shared start.
  lora::Matrix<double> A8b;
  {
    Model model = base;
    lora::nn::LoraInjectConfig config = lora_config(8);
    config.seed = 6;
    lora::nn::inject_lora(model, config);
    train_and_evaluate("lora r=8 seed 6", model, base_params, setup.b_train, kFinetuneEpochs, kLrLora, setup, false);
    A8b = model.lora_layers()[1].second->A().cast<double>();
  }
  const lora::Matrix<double> grid = lora::analysis::subspace_similarity_grid(A8, A64);
  const lora::Matrix<double> grid_seeds = lora::analysis::subspace_similarity_grid(A8b, A64);
  const lora::Matrix<double> grid_r8 = lora::analysis::subspace_similarity_grid(A8, A8b);
  std::printf("\nSubspace similarity phi(A_r=8, A_r=64, i, j) of layers.2 (1 = one subspace holds the other; two "
              "random subspaces give about max(i, j) / 1024):\n| i | j = 1 | 2 | 4 | 8 | 16 | 32 | 64 | "
              "r = 8 from seed 6, j = 1 | 8 | 64 |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (lora::Index i = 1; i <= 8; ++i) {
    std::printf("| %ld |", static_cast<long>(i));
    for (const lora::Index j : {1, 2, 4, 8, 16, 32, 64}) std::printf(" %.3f |", grid(i - 1, j - 1));
    for (const lora::Index j : {1, 8, 64}) std::printf(" %.3f |", grid_seeds(i - 1, j - 1));
    std::printf("\n");
  }
  std::printf("Two r = 8 runs from seeds 5 and 6: phi(1, 1) = %.3f, phi(8, 8) = %.3f.\n", grid_r8(0, 0),
              grid_r8(7, 7));
  std::printf("\nAmplification factor ||dW||_F / ||U^T W0 V||_F of layers.2 (the paper: about 21.5 at r = 4 and "
              "1.9 at r = 64 for GPT-3's W_q), and the rank of dW:\n| r | ||dW||_F | ||U^T W0 V||_F | ||W0||_F "
              "| factor | numerical rank | entropy rank |\n|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Analysis& a : analyses)
    std::printf("| %d | %.4f | %.4f | %.2f | %.2f | %ld | %.2f |\n", a.rank, a.amp.delta_norm, a.amp.projection_norm,
                a.amp.base_norm, a.amp.factor, static_cast<long>(a.numerical_rank), a.entropy_rank);
  std::printf("\nTotal time: %.1f s\n", seconds_since(program_start));
  print_transformer_counts();
  return 0;
}
