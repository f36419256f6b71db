#!/bin/sh
# Draws the rank sweep: accuracy on task B against the share of the base's parameters that train.
#   bench/plot_rank_sweep.sh [rank_sweep.csv] [docs/rank_sweep.svg]
# The CSV comes from build/release/examples/rank_sweep. Needs gnuplot (Debian: gnuplot-nox).
set -eu
csv=${1:-rank_sweep.csv}
out=${2:-docs/rank_sweep.svg}
command -v gnuplot >/dev/null || { echo "plot_rank_sweep.sh: gnuplot is missing (apt-get install gnuplot-nox)" >&2; exit 1; }
[ -r "$csv" ] || { echo "plot_rank_sweep.sh: cannot read $csv" >&2; exit 1; }
value() { awk -F, -v m="$1" -v c="$2" '$1 == m { print $c }' "$csv"; }
frozen=$(value frozen 5)
full=$(value full 5)
[ -n "$frozen" ] && [ -n "$full" ] || { echo "plot_rank_sweep.sh: $csv lacks the frozen or full row" >&2; exit 1; }
tmp="$out.tmp"
gnuplot <<GNUPLOT
set terminal svg size 760,460 dynamic font "sans,12"
set output "$tmp"
set datafile separator ","
set key bottom right box opaque
set logscale x
set xrange [0.3:200]
set yrange [0:1]
set format x "%g %%"
set xlabel "trainable parameters, % of the base MLP (log scale)"
set ylabel "accuracy on task B (held out)"
set title "LoRA rank sweep: MLP 32-1024-1024-10 pretrained on task A, fine-tuned on task B"
set grid
target = $frozen + 0.95 * ($full - $frozen)
plot $frozen with lines dt 2 lc rgb "#888888" title sprintf("frozen base (%.3f)", $frozen), \
     $full with lines dt 2 lc rgb "#d62728" title sprintf("full fine-tuning (%.3f)", $full), \
     target with lines dt 3 lc rgb "#2ca02c" title "95 % of full fine-tuning's gain", \
     "$csv" every ::1 using (strcol(1) eq "lora" ? \$4 : 1/0):5 with linespoints pt 7 lc rgb "#1f77b4" \
        title "LoRA, r = 1 ... 64 (hidden layers) + head", \
     "$csv" every ::1 using (strcol(1) eq "lora" ? \$4 : 1/0):5:(sprintf("r=%d", \$2)) with labels offset 0,1 notitle, \
     "$csv" every ::1 using (strcol(1) eq "head" ? \$4 : 1/0):5 with points pt 5 ps 1.2 lc rgb "#ff7f0e" \
        title "head only", \
     "$csv" every ::1 using (strcol(1) eq "full" ? \$4 : 1/0):5 with points pt 9 ps 1.4 lc rgb "#d62728" notitle
GNUPLOT
mv "$tmp" "$out"
echo "wrote $out"
