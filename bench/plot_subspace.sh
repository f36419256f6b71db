#!/bin/sh
# Draws the paper's Figure 3 for finetune_transformer's adapters: the subspace similarity
# phi(A_r=8, A_r=64, i, j) of the last layer's value adapters, i = 1..8 against j = 1..64.
#   bench/plot_subspace.sh [finetune_transformer_out/subspace_grid.csv] [docs/subspace_grid.png]
# Needs gnuplot (Debian: gnuplot-nox).
set -eu
csv=${1:-build/finetune_transformer_out/subspace_grid.csv}
out=${2:-docs/subspace_grid.png}
command -v gnuplot >/dev/null || { echo "plot_subspace.sh: gnuplot is missing (apt-get install gnuplot-nox)" >&2; exit 1; }
[ -r "$csv" ] || { echo "plot_subspace.sh: cannot read $csv (run scripts/finetune_transformer.sh)" >&2; exit 1; }
tmp="$out.tmp"
gnuplot <<GNUPLOT
set terminal pngcairo size 1000,300 font "sans,10"
set output "$tmp"
set datafile separator ","
set title "Subspace similarity of the value adapters, r = 8 against r = 64 (last layer): phi(A_{r=8}, A_{r=64}, i, j)"
set xlabel "j (top-j right singular vectors of A, r = 64)"
set ylabel "i (r = 8)"
set xrange [0.5:64.5]
set yrange [8.5:0.5]
set cbrange [0:1]
set palette defined (0 "#ffffff", 0.5 "#f08a24", 1 "#7a0000")
set view map
plot "$csv" every ::1 using 2:1:3 with image notitle
GNUPLOT
mv "$tmp" "$out"
echo "wrote $out"
