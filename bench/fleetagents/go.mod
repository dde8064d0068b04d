module meshbridge.local/bench/fleetagents

go 1.22
