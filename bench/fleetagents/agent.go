package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// tries is how often a request the CA refused for load (429, 503) or could not be reached for is
// sent, as the Python client's FIRST_CONTACT_TRIES.
const tries = 8

// record is what one agent saw, in the keys bench/fleet_event.py's tally reads.
type record struct {
	Name              string          `json:"name"`
	Polls             int             `json:"polls"`
	Answers           []float64       `json:"answers"`
	RotateAt          *float64        `json:"rotate_at,omitempty"`
	WantGeneration    json.RawMessage `json:"want_generation,omitempty"`
	RenewedAt         *float64        `json:"renewed_at,omitempty"`
	RenewStatus       *int            `json:"renew_status,omitempty"`
	RenewedGeneration json.RawMessage `json:"renewed_generation,omitempty"`
	AfterRenewal      *afterRenewal   `json:"after_renewal,omitempty"`
	RenewRefused      int             `json:"renew_refused,omitempty"`
	ReadsRefused      int             `json:"reads_refused,omitempty"`
	Error             string          `json:"error,omitempty"`
}

type afterRenewal struct {
	Status         int             `json:"status"`
	RotateRequired *bool           `json:"rotate_required"`
	Generation     json.RawMessage `json:"generation"`
}

// desired is the part of GET /v1/clusters/{name}/desired the agent acts on.
type desired struct {
	Revision       json.RawMessage `json:"revision"`
	TrustBundle    string          `json:"trust_bundle"`
	RotateRequired *bool           `json:"rotate_required"`
	Generation     json.RawMessage `json:"generation"`
}

type agent struct {
	spec   agentSpec
	base   string
	http   *http.Client
	trust  *trust
	events *events
	rec    *record
}

func now() float64 { return float64(time.Now().UnixNano()) / 1e9 }

// run is the agent's life: first contact, then long-polls until stopped. An error is recorded and
// reported unless it is the stop itself.
func (a *agent) run(ctx context.Context) {
	started := time.Now()
	err := a.live(ctx)
	if err == nil || ctx.Err() != nil {
		return
	}
	a.rec.Error = fmt.Sprintf("%v after %d long-poll(s), %d answer(s), %.1f s after start",
		err, a.rec.Polls, len(a.rec.Answers), time.Since(started).Seconds())
	a.events.put("error", a.spec.Name, a.rec.Error)
}

// live mirrors the Python client's _agent: long-poll; on rotate_required renew with proof and read
// the desired state again (it must say the rotation is done); before that, report every new trust
// bundle as served.
func (a *agent) live(ctx context.Context) error {
	d, err := retried(ctx, func() (*desired, error) { return a.firstContact(ctx) })
	if err != nil {
		return err
	}
	rev := d.Revision
	a.events.put("polling", a.spec.Name, rev)
	rotated := false
	for {
		a.rec.Polls++
		status, body, err := a.read(ctx, a.desiredPath()+"?wait=60&revision="+url.QueryEscape(param(rev)))
		t := now()
		if err != nil {
			return err
		}
		if status != http.StatusOK {
			return fmt.Errorf("desired answered %d", status)
		}
		var next desired
		if err := json.Unmarshal(body, &next); err != nil {
			return fmt.Errorf("desired: %w", err)
		}
		a.trust.add(next.TrustBundle)
		if bytes.Equal(next.Revision, rev) { // waited the full minute: nothing changed
			continue
		}
		a.rec.Answers = append(a.rec.Answers, t)
		rev = next.Revision
		if next.RotateRequired != nil && *next.RotateRequired && !rotated {
			rotated = true
			if rev, err = a.rotate(ctx, t, next); err != nil {
				return err
			}
			continue
		}
		if !rotated {
			if _, err := retried(ctx, func() (struct{}, error) { return struct{}{}, a.reportServed(ctx, next.TrustBundle) }); err != nil {
				return err
			}
			a.events.put("polling", a.spec.Name, rev)
		}
	}
}

// rotate renews (answered at t with d) and reads the desired state after it; it returns the
// revision to long-poll from.
func (a *agent) rotate(ctx context.Context, t float64, d desired) (json.RawMessage, error) {
	a.rec.RotateAt, a.rec.WantGeneration = &t, d.Generation
	status, body, err := a.renew(ctx)
	if err != nil {
		return nil, err
	}
	done := now()
	a.rec.RenewedAt, a.rec.RenewStatus = &done, &status
	if status == http.StatusCreated {
		var issued struct {
			Generation json.RawMessage `json:"generation"`
		}
		if err := json.Unmarshal(body, &issued); err != nil {
			return nil, fmt.Errorf("renewal: %w", err)
		}
		a.rec.RenewedGeneration = issued.Generation
	}
	st, body, err := a.read(ctx, a.desiredPath())
	if err != nil {
		return nil, err
	}
	var after desired
	_ = json.Unmarshal(body, &after) // an error answer leaves the fields empty, as .get() does
	a.rec.AfterRenewal = &afterRenewal{Status: st, RotateRequired: after.RotateRequired, Generation: after.Generation}
	a.events.put("renewed", a.spec.Name, st)
	if after.Revision == nil {
		return d.Revision, nil
	}
	return after.Revision, nil
}

// read GETs path, again after a 429 or 503 as the agent's loop does (after Retry-After when given),
// counting each refusal; the last answer is returned.
func (a *agent) read(ctx context.Context, path string) (int, []byte, error) {
	return a.untilAdmitted(ctx, http.MethodGet, path, nil, &a.rec.ReadsRefused)
}

// renew posts the renewal, again after a 429 or 503, counting each refusal.
func (a *agent) renew(ctx context.Context) (int, []byte, error) {
	body, _ := json.Marshal(map[string]string{"csr": a.spec.CSR, "proof": a.spec.Proof})
	return a.untilAdmitted(ctx, http.MethodPost, "/v1/clusters/"+a.spec.Name+"/intermediate", body, &a.rec.RenewRefused)
}

// untilAdmitted sends a request until it is answered other than 429 or 503 (waiting Retry-After
// when given, else a backoff) or tries run out, adding each refusal to refusals.
func (a *agent) untilAdmitted(ctx context.Context, method, path string, body []byte, refusals *int) (int, []byte, error) {
	for attempt := 0; ; attempt++ {
		status, resp, err := a.doHeaders(ctx, method, path, body)
		if err != nil {
			return 0, nil, err
		}
		if !refused(status.code) || attempt == tries-1 {
			return status.code, resp, nil
		}
		*refusals++
		wait := backoff(attempt)
		if s, err := strconv.Atoi(status.retryAfter); err == nil && s >= 0 {
			wait = time.Duration(s) * time.Second
		}
		if err := sleep(ctx, wait); err != nil {
			return 0, nil, err
		}
	}
}

func (a *agent) firstContact(ctx context.Context) (*desired, error) {
	status, body, err := a.do(ctx, http.MethodGet, a.desiredPath(), nil)
	if err != nil {
		return nil, err
	}
	if status != http.StatusOK {
		return nil, statusError(status)
	}
	var d desired
	if err := json.Unmarshal(body, &d); err != nil {
		return nil, fmt.Errorf("desired: %w", err)
	}
	a.trust.add(d.TrustBundle)
	return &d, a.reportServed(ctx, d.TrustBundle)
}

// reportServed is PUT .../status as an agent whose istiod serves bundle and signs with its
// intermediate (the Python client's report_served).
func (a *agent) reportServed(ctx context.Context, bundle string) error {
	fps, err := fingerprints(bundle)
	if err != nil {
		return err
	}
	at := time.Now().UTC().Format("2006-01-02T15:04:05.000000Z")
	body, _ := json.Marshal(map[string]any{
		"installed_generation": a.spec.Generation,
		"installed_serial":     a.spec.Serial,
		"served": map[string]any{
			"observed_at": at, "bundle": fps, "bundle_since": at,
			"signing_serial": a.spec.Serial, "signing_since": at,
		},
	})
	status, _, err := a.do(ctx, http.MethodPut, "/v1/clusters/"+a.spec.Name+"/status", body)
	if err != nil {
		return err
	}
	if status/100 != 2 {
		return statusError(status)
	}
	return nil
}

func (a *agent) desiredPath() string { return "/v1/clusters/" + a.spec.Name + "/desired" }

type answer struct {
	code       int
	retryAfter string
}

func (a *agent) do(ctx context.Context, method, path string, body []byte) (int, []byte, error) {
	st, resp, err := a.doHeaders(ctx, method, path, body)
	return st.code, resp, err
}

// doHeaders sends one request over the agent's connection and reads the whole answer (so the
// connection is kept for the next).
func (a *agent) doHeaders(ctx context.Context, method, path string, body []byte) (answer, []byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, a.base+path, rd)
	if err != nil {
		return answer{}, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+a.spec.Token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := a.http.Do(req)
	var distrust *untrusted
	if errors.As(err, &distrust) {
		return answer{}, nil, distrust
	}
	if err != nil {
		return answer{}, nil, &transportError{err}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, nil, &transportError{err}
	}
	return answer{code: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After")}, data, nil
}

// transportError is a request that got no answer (connection refused, reset, timed out).
type transportError struct{ err error }

func (e *transportError) Error() string { return e.err.Error() }
func (e *transportError) Unwrap() error { return e.err }

type statusError int

func (e statusError) Error() string { return "answered " + strconv.Itoa(int(e)) }

func refused(code int) bool {
	return code == http.StatusTooManyRequests || code == http.StatusServiceUnavailable
}

// retried calls call again after a backoff when the CA could not be reached or answered 429 or
// 503, as the agent's loop does (and the Python client's _retried).
func retried[T any](ctx context.Context, call func() (T, error)) (T, error) {
	for attempt := 0; ; attempt++ {
		v, err := call()
		var te *transportError
		var se statusError
		again := errors.As(err, &te) || (errors.As(err, &se) && refused(int(se)))
		if err == nil || !again || attempt == tries-1 || ctx.Err() != nil {
			return v, err
		}
		if err := sleep(ctx, backoff(attempt)); err != nil {
			return v, err
		}
	}
}

// backoff before try attempt+1: doubling up to 30 s, jittered so a fleet spreads out.
func backoff(attempt int) time.Duration {
	s := math.Min(math.Pow(2, float64(attempt)), 30) * (0.5 + rand.Float64())
	return time.Duration(s * float64(time.Second))
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return errStopped
	case <-time.After(d):
		return nil
	}
}

// param is a revision as a query parameter: a JSON string's text, a number's digits.
func param(rev json.RawMessage) string {
	var s string
	if json.Unmarshal(rev, &s) == nil {
		return s
	}
	return string(rev)
}
