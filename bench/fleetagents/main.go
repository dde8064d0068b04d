// Command fleetagents is the simulated fleet of bench/fleet_event.py in a compiled language: the
// same agents as its Python client (one keep-alive HTTPS connection each, long-polling the desired
// state, reporting what their istiod serves, renewing with proof when told to rotate), in one
// process whose cost per agent is small enough that, on a 2-core machine shared with the CA and
// its database, the bench measures the server and not itself (issue 15: at 10,000 agents the
// Python client took 0.65-0.8 of the 2 cores).
//
// Input: -spec FILE, a JSON object {"url", "anchor" (PEM file the first TLS trust comes from),
// "agents": [{"name", "token", "csr", "proof", "generation", "serial"}]}.
// Output: one JSON array per line on stdout for each event the bench waits on,
// ["polling", name, revision], ["renewed", name, status] or ["error", name, message]; and, once
// standard input reaches its end (the bench's stop), every agent's record as a JSON array in
// -out FILE, with times as Unix seconds (the bench maps them onto its monotonic clock).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

type spec struct {
	URL    string      `json:"url"`
	Anchor string      `json:"anchor"`
	Agents []agentSpec `json:"agents"`
}

type agentSpec struct {
	Name       string          `json:"name"`
	Token      string          `json:"token"`
	CSR        string          `json:"csr"`
	Proof      string          `json:"proof"`
	Generation json.RawMessage `json:"generation"`
	Serial     json.RawMessage `json:"serial"`
}

func main() {
	specPath := flag.String("spec", "", "the bench's JSON: url, anchor, agents")
	outPath := flag.String("out", "", "where the agents' records go when standard input ends")
	flag.Parse()
	if *specPath == "" || *outPath == "" {
		fmt.Fprintln(os.Stderr, "fleetagents: both -spec FILE and -out FILE are required")
		os.Exit(2)
	}
	if err := run(*specPath, *outPath); err != nil {
		fmt.Fprintf(os.Stderr, "fleetagents: %v\n", err)
		os.Exit(1)
	}
}

func run(specPath, outPath string) error {
	raw, err := os.ReadFile(specPath)
	if err != nil {
		return err
	}
	var s spec
	if err := json.Unmarshal(raw, &s); err != nil {
		return fmt.Errorf("%s: %w", specPath, err)
	}
	anchor, err := os.ReadFile(s.Anchor)
	if err != nil {
		return err
	}
	trust, err := newTrust(anchor)
	if err != nil {
		return err
	}
	base, err := url.Parse(s.URL)
	if err != nil {
		return fmt.Errorf("url %q: %w", s.URL, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go stopOnEOFOrSignal(cancel)
	events := newEvents(os.Stdout)
	records := make([]*record, len(s.Agents))
	var wg sync.WaitGroup
	for i, a := range s.Agents {
		records[i] = &record{Name: a.Name, Answers: []float64{}}
		wg.Add(1)
		go func(a agentSpec, rec *record) {
			defer wg.Done()
			ag := &agent{spec: a, base: s.URL, http: newClient(trust, base.Hostname()), trust: trust, events: events, rec: rec}
			ag.run(ctx)
		}(a, records[i])
	}
	wg.Wait()
	out, err := json.Marshal(records)
	if err != nil {
		return err
	}
	return os.WriteFile(outPath, out, 0o600)
}

// stopOnEOFOrSignal cancels once standard input ends (the bench closes it to stop the agents) or a
// SIGTERM or SIGINT arrives.
func stopOnEOFOrSignal(cancel context.CancelFunc) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	eof := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(eof)
	}()
	select {
	case <-sig:
	case <-eof:
	}
	cancel()
}

// events writes one JSON line per event, whole lines only, flushed at once (the bench times the
// phases by them).
type events struct {
	mu sync.Mutex
	w  *bufio.Writer
}

func newEvents(w io.Writer) *events { return &events{w: bufio.NewWriter(w)} }

func (e *events) put(kind, name string, detail any) {
	line, err := json.Marshal([]any{kind, name, detail})
	if err != nil {
		panic(err) // strings, numbers and raw JSON only: cannot fail
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	_, _ = e.w.Write(append(line, '\n'))
	_ = e.w.Flush()
}

var errStopped = errors.New("stopped")
