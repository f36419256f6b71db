#!/bin/sh
# Draws the rank sweep: accuracy on task B against the share of the base's parameters that train.
#   bench/plot_rank_sweep.sh [rank_sweep.csv] [docs/rank_sweep.png]
# The CSV comes from build/release/examples/rank_sweep. Needs gnuplot (Debian: gnuplot-nox).
set -eu
csv=${1:-rank_sweep.csv}
out=${2:-docs/rank_sweep.png}
command -v gnuplot >/dev/null || { echo "plot_rank_sweep.sh: gnuplot is missing (apt-get install gnuplot-nox)" >&2; exit 1; }
[ -r "$csv" ] || { echo "plot_rank_sweep.sh: cannot read $csv" >&2; exit 1; }
value() { awk -F, -v m="$1" -v c="$2" '$1 == m { print $c }' "$csv"; }
frozen=$(value frozen 5)
full=$(value full 5)
[ -n "$frozen" ] && [ -n "$full" ] || { echo "plot_rank_sweep.sh: $csv lacks the frozen or full row" >&2; exit 1; }
tmp="$out.tmp"
gnuplot <<GNUPLOT
set terminal pngcairo size 900,540 font "sans,11"
set output "$tmp"
set datafile separator ","
set key bottom right box opaque spacing 1.2
set logscale x
set xrange [0.5:200]
set yrange [0.7:0.97]
set format x "%g %%"
set xlabel "trainable parameters, % of the base MLP (log scale)"
set ylabel "accuracy on task B (held out)"
set title sprintf("LoRA rank sweep: MLP 32-1024-1024-10 pretrained on task A, fine-tuned on task B\\n(frozen base: %.3f)", $frozen)
set grid
set arrow from 2, graph 0 to 2, graph 1 nohead dt 4 lc rgb "#555555"
set label "2 %" at 2, graph 0.04 right offset -0.5,0 tc rgb "#555555"
target = $frozen + 0.95 * ($full - $frozen)
plot $full with lines dt 2 lw 1.5 lc rgb "#d62728" title sprintf("full fine-tuning: %.3f with 100 %% of the parameters", $full), \
     target with lines dt 3 lw 1.5 lc rgb "#2ca02c" title "95 % of full fine-tuning's gain over the frozen base", \
     "$csv" every ::1 using (strcol(1) eq "lora" ? \$4 : 1/0):5 with linespoints pt 7 ps 1.2 lw 1.5 lc rgb "#1f77b4" \
        title "LoRA on the hidden layers + trainable head, r = 1 ... 64", \
     "$csv" every ::1 using (strcol(1) eq "lora" ? \$4 : 1/0):5:(sprintf("r=%d", \$2)) with labels offset 0,1.1 notitle, \
     "$csv" every ::1 using (strcol(1) eq "head" ? \$4 : 1/0):5 with points pt 5 ps 1.5 lc rgb "#ff7f0e" \
        title "head only", \
     "$csv" every ::1 using (strcol(1) eq "full" ? \$4 : 1/0):5 with points pt 9 ps 1.8 lc rgb "#d62728" notitle
GNUPLOT
mv "$tmp" "$out"
echo "wrote $out"
