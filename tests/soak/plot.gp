# The soak's timeline (tools/soak): gnuplot -e "dir='OUT/timeline'; out='soak.png'" plot.gp
# Members are lanes; a bar is a tenure (on_listen .. is_active() false, or
# the process's end), coloured by channel; faults are marks on the lane of
# their target (the "server/any" lane: restarts, terminated waiters, deleted
# rows), one colour and point per kind; confirmed messages never delivered and violations are red, on the
# "lost" lane (plain losses inside fault windows are by design).
set terminal pngcairo size 1600,700 font "sans,10" noenhanced
set output out
load dir.'/lanes.gp'
set xlabel "seconds from the start of the publisher"
set grid xtics lc rgb "#dddddd"
set key outside right top
set style fill solid 0.85 noborder
set palette defined (1 "#1f77b4", 2 "#aec7e8", 3 "#2ca02c", 4 "#98df8a", 5 "#9467bd", 6 "#c5b0d5", \
                     7 "#8c564b", 8 "#c49c94", 9 "#17becf", 10 "#9edae5", 11 "#bcbd22", 12 "#dbdb8d")
set cbrange [1:12]
# One colour and point type per fault kind (check.py's order: kill, term,
# stop, terminate_holder, terminate_waiter, partition, delete_row, restart);
# a fault's line runs from its injection to its end (SIGCONT, the partition
# healed, the killed member restarted).
fault_colour(k) = word("0x000000 0xff7f0e 0x8c6d31 0xe377c2 0x7f7f7f 0x17becf 0xbcbd22 0x393b79", int(k)) + 0
fault_point(k) = int(word("2 9 5 11 13 7 4 15", int(k)))
unset colorbox
plot dir.'/tenures.dat' using 1:2:3:4:5:6:7 with boxxyerror lc palette notitle, \
     for [i=1:nchannels] NaN with boxes lc palette cb i title word(channels, i), \
     dir.'/faults.dat' using 1:3:($2-$1):(0):(fault_colour($4)) with vectors nohead lw 3 lc rgb variable notitle, \
     dir.'/faults.dat' using 1:3:(fault_point($4)):(fault_colour($4)) with points pt variable ps 1.2 lc rgb variable notitle, \
     for [i=1:words(faults)] NaN with linespoints pt fault_point(i) ps 1.2 lw 3 lc rgb fault_colour(i) title word(faults, i), \
     dir.'/losses.dat' using 1:2 with points pt 7 ps 0.8 lc rgb "#d62728" title "confirmed, never delivered", \
     dir.'/violations.dat' using 1:2 with points pt 2 ps 2.5 lw 3 lc rgb "#ff0000" title "violation"
