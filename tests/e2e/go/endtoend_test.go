package istiocheck

import (
	"fmt"
	"strconv"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/pkg/simulation"
	"istio.io/istio/pilot/test/xdstest"
)

// TestEndToEnd follows one call of an end-to-end export (exports[].mode: end-to-end) hop by hop
// through Istio's own xDS for the rendered objects of a (importer) and b (exporter):
// sidecar a → egress a (TLS forwarded on SNI) → b's ingress (forwarded on SNI; other SNIs refused)
// → b's destination sidecar, which terminates the mTLS and sees a's caller principal, allowed for
// the declared consumer workload and denied for another workload of a.
//
// Env: MESHBRIDGE_SIM_A_DIR, MESHBRIDGE_SIM_B_DIR (rendered objects), MESHBRIDGE_E2E_HOST
// (ratings.bookinfo.remote), MESHBRIDGE_E2E_PORT (9080), MESHBRIDGE_E2E_PROTOCOL (HTTP or TCP),
// MESHBRIDGE_E2E_SNI, MESHBRIDGE_E2E_WORKLOAD (the destination's SPIFFE ID),
// MESHBRIDGE_E2E_ALLOWED / MESHBRIDGE_E2E_DENIED (callers' SPIFFE IDs, comma-separated),
// MESHBRIDGE_E2E_REFUSED_SNI (comma-separated SNIs b's ingress must not route).
func TestEndToEnd(t *testing.T) {
	sc := loadScenario(t)
	host := envOr("MESHBRIDGE_E2E_HOST", "ratings.bookinfo.remote")
	port := envInt(t, "MESHBRIDGE_E2E_PORT", 9080)
	proto := simulation.Protocol(strings.ToLower(envOr("MESHBRIDGE_E2E_PROTOCOL", "http")))
	sni := envOr("MESHBRIDGE_E2E_SNI", fmt.Sprintf("%d.ratings.bookinfo.mb-e2e", port))
	workload := envOr("MESHBRIDGE_E2E_WORKLOAD", "spiffe://b.mesh/ns/bookinfo/sa/bookinfo-ratings")
	destination := envOr("MESHBRIDGE_E2E_DESTINATION", "ratings.bookinfo.svc.cluster.local")
	destIP := envOr("MESHBRIDGE_E2E_DESTINATION_IP", "10.2.1.5")
	destApp := envOr("MESHBRIDGE_E2E_DESTINATION_APP", "ratings")
	allowed := strings.Split(envOr("MESHBRIDGE_E2E_ALLOWED", "spiffe://a.mesh/ns/bookinfo/sa/bookinfo-productpage"), ",")
	denied := strings.Split(envOr("MESHBRIDGE_E2E_DENIED",
		"spiffe://a.mesh/ns/bookinfo/sa/bookinfo-other,spiffe://c.mesh/ns/bookinfo/sa/bookinfo-productpage"), ",")
	refused := strings.Split(envOr("MESHBRIDGE_E2E_REFUSED_SNI",
		fmt.Sprintf("%d.details.bookinfo.mb-e2e,outbound_.%d_._.%s", port, port, destination)), ",")

	a := newSimCluster(t, "a", sc.aDir, baseA(t, sc), "", sc.aTrustDomain)
	b := newSimCluster(t, "b", sc.bDir, baseBFor(t, sc), baseIstioB, sc.bTrustDomain)
	egressGW := a.proxy(t, model.Router, "istio-system", "10.1.0.20", sc.egressLabels, sc.istioVersion)
	sidecar := a.proxy(t, model.SidecarProxy, "bookinfo", "10.1.1.5", map[string]string{"app": "productpage"}, sc.istioVersion)
	ingressGW := b.proxy(t, model.Router, "istio-system", "10.2.0.30",
		map[string]string{"app": "istio-ingressgateway", "istio": "ingressgateway"}, sc.istioVersion)
	dest := b.proxy(t, model.SidecarProxy, "bookinfo", destIP, map[string]string{"app": destApp}, sc.istioVersion)
	vip := serviceEntryVIP(t, sc.aDir, host)
	lport := 0 // a's egress gateway listener the sidecar's cluster leads to

	t.Run(fmt.Sprintf("1 sidecar in a originates Istio mTLS to %s with SNI %s", workload, sni), func(t *testing.T) {
		call := simulation.Call{Address: vip, Port: port, Protocol: proto, CallMode: simulation.CallModeOutbound}
		if proto == simulation.HTTP {
			call.HostHeader = fmt.Sprintf("%s:%d", host, port)
		}
		res := sidecar.sim.Run(call)
		want := fmt.Sprintf("outbound|%d||%s", port, host)
		if res.Error != nil || res.ClusterMatched != want {
			sidecar.dump(t, "sidecar a")
			t.Fatalf("err=%v cluster %q, want %q", res.Error, res.ClusterMatched, want)
		}
		c := sidecar.cluster(t, res.ClusterMatched)
		checkIstioMTLS(t, c, sni, []string{workload})
		for _, u := range upstreamTLS(t, c) {
			if alpn := u.GetCommonTlsContext().GetAlpnProtocols(); !contains(alpn, "istio") {
				t.Errorf("cluster %s offers ALPN %v, without istio: the destination's inbound mTLS chains match on it", c.Name, alpn)
			}
		}
		lport = egressListenPort(t, sidecar, c, sc)
		t.Logf("VIP %s:%d -> cluster %s (SNI %s, SAN %s) -> a's egress gateway, listener port %d", vip, port, c.Name, sni, workload, lport)
	})
	if t.Failed() {
		return
	}

	t.Run("2 egress gateway in a forwards the TLS unopened on its SNI to b's ingress", func(t *testing.T) {
		res := egressGW.sim.Run(simulation.Call{Port: lport, Protocol: simulation.TCP, TLS: simulation.MTLS, Sni: sni,
			CallMode: simulation.CallModeGateway})
		if res.Error != nil {
			egressGW.dump(t, "egress a")
			t.Fatalf("SNI %s on %d: %v (listener %q, chain %q)", sni, lport, res.Error, res.ListenerMatched, res.FilterChainMatched)
		}
		checkForwarded(t, egressGW, res, sni, fmt.Sprintf("%s:%d", sc.gwAddr, sc.tcpGwPort))
		// A sidecar's own SNI for a local service gets nowhere through this port.
		res = egressGW.sim.Run(simulation.Call{Port: lport, Protocol: simulation.TCP, TLS: simulation.MTLS,
			Sni: "outbound_.9080_._.productpage.bookinfo.svc.cluster.local", CallMode: simulation.CallModeGateway})
		if res.Error == nil && strings.Contains(res.ClusterMatched, "productpage") {
			t.Errorf("egress a forwards a local service's SNI to %s", res.ClusterMatched)
		}
	})
	if t.Failed() {
		return
	}

	t.Run("3 b's ingress forwards the exported SNI unopened to "+destination+" and refuses others", func(t *testing.T) {
		call := simulation.Call{Port: sc.tcpGwTargetPort, Protocol: simulation.TCP, TLS: simulation.MTLS, Sni: sni,
			CallMode: simulation.CallModeGateway}
		res := ingressGW.sim.Run(call)
		if res.Error != nil {
			ingressGW.dump(t, "ingress b")
			t.Fatalf("SNI %s: %v (listener %q, chain %q)", sni, res.Error, res.ListenerMatched, res.FilterChainMatched)
		}
		fc := checkForwarded(t, ingressGW, res, sni, fmt.Sprintf("%s:%d", destination, port))
		// b's own policies on that chain (the RBAC filter Istio puts on passthrough chains) let it pass:
		// the caller's identity is inside the TLS the gateway does not open.
		if ok, why := evalNetworkRBAC(t, fc, rbacRequest{port: sc.tcpGwTargetPort, sni: sni}); !ok {
			t.Errorf("RBAC on b's ingress refuses the exported SNI %s: %s", sni, why)
		}
		for _, other := range refused {
			call.Sni = other
			res := ingressGW.sim.Run(call)
			if res.Error == nil {
				t.Errorf("b's ingress routes the unexported SNI %s to %s", other, res.ClusterMatched)
			} else {
				t.Logf("unexported SNI %s: refused (%v)", other, res.Error)
			}
		}
	})
	if t.Failed() {
		return
	}

	t.Run("4 b's destination sidecar terminates the mTLS and admits only the declared consumers", func(t *testing.T) {
		// What the caller's sidecar offers: Istio's ALPN filter sets istio-http/1.1 on HTTP/1.1 mTLS
		// (util.ALPNInMesh... are the cluster's, replaced per request by the istio.alpn filter), and
		// istio-peer-exchange, istio on TCP (util.ALPNInMeshWithMxc).
		alpn := "istio-peer-exchange"
		if proto == simulation.HTTP {
			alpn = "istio-http/1.1"
		}
		res := dest.sim.Run(simulation.Call{Address: destIP, Port: port, Protocol: proto, TLS: simulation.MTLS, Sni: sni,
			Alpn: alpn, HostHeader: fmt.Sprintf("%s:%d", host, port), CallMode: simulation.CallModeInbound})
		if res.Error != nil {
			dest.dump(t, "destination b")
			t.Fatalf("inbound mTLS with SNI %s: %v (listener %q, chain %q)", sni, res.Error, res.ListenerMatched, res.FilterChainMatched)
		}
		fc := mtlsChain(t, dest, res, alpn)
		checkTerminatesIstioMTLS(t, fc)
		http := proto == simulation.HTTP
		eval := func(req rbacRequest) (bool, string) {
			ok, why := evalNetworkRBAC(t, fc, req)
			if ok && http {
				ok, why = evalRBAC(t, fc, req)
			}
			return ok, why
		}
		base := rbacRequest{authority: fmt.Sprintf("%s:%d", host, port), path: "/", port: port, sni: sni}
		for _, p := range allowed {
			req := base
			req.principal = p
			if ok, why := eval(req); !ok {
				t.Errorf("the destination refuses the declared consumer %s: %s", p, why)
			} else {
				t.Logf("caller %s: admitted (%s)", p, why)
			}
		}
		for _, p := range denied {
			req := base
			req.principal = p
			if ok, why := eval(req); ok {
				t.Errorf("the destination admits %s, not a declared consumer (%s)", p, why)
			} else {
				t.Logf("caller %s: denied (%s)", p, why)
			}
		}
		// b's own workloads, calling with their sidecar's SNI, are not touched by the policy.
		local := base
		local.principal = "spiffe://b.mesh/ns/bookinfo/sa/bookinfo-reviews"
		local.sni = fmt.Sprintf("outbound_.%d_._.%s", port, destination)
		if ok, why := eval(local); !ok {
			t.Errorf("the end-to-end policy refuses a local caller %s: %s", local.principal, why)
		}
	})
}

func contains(list []string, v string) bool {
	for _, s := range list {
		if s == v {
			return true
		}
	}
	return false
}

// checkForwarded asserts that a gateway passed the call on without terminating or originating TLS:
// the chain matched the SNI and has no transport socket, its cluster adds no TLS, and the cluster's
// endpoint is want. It returns the matched chain.
func checkForwarded(t *testing.T, gw *simProxy, res simulation.Result, sni, want string) *listener.FilterChain {
	t.Helper()
	fc := gw.filterChainFor(t, res, sni)
	if !contains(fc.GetFilterChainMatch().GetServerNames(), sni) {
		t.Errorf("chain %q does not match SNI %s (server_names %v)", res.FilterChainMatched, sni, fc.GetFilterChainMatch().GetServerNames())
	}
	if fc.GetTransportSocket() != nil {
		t.Errorf("chain %q terminates TLS; end-to-end traffic must pass unopened", res.FilterChainMatched)
	}
	c := gw.cluster(t, res.ClusterMatched)
	if ctxs := upstreamTLS(t, c); len(ctxs) != 0 {
		t.Errorf("cluster %s originates TLS (%d contexts): the caller's mTLS would be wrapped again", c.Name, len(ctxs))
	}
	eps := gw.endpointsOf(t, c)
	if len(eps) != 1 || eps[0] != want {
		t.Errorf("cluster %s endpoints %v, want [%s]", c.Name, eps, want)
	}
	t.Logf("SNI %s: listener %s, chain %q (no TLS context) -> cluster %s (no TLS) -> %v", sni, res.ListenerMatched,
		res.FilterChainMatched, c.Name, eps)
	return fc
}

// mtlsChain returns the chain an inbound mTLS call matched: of the chains carrying the matched name
// (a port's plaintext and mTLS chains share it), the one matching transport protocol "tls" and the
// ALPN the caller's sidecar offers (`alpn`).
func mtlsChain(t *testing.T, p *simProxy, res simulation.Result, alpn string) *listener.FilterChain {
	t.Helper()
	l := xdstest.ExtractListener(res.ListenerMatched, p.sim.Listeners)
	var found []*listener.FilterChain
	var seen []string
	for _, fc := range l.GetFilterChains() {
		m := fc.GetFilterChainMatch()
		if fc.GetName() != res.FilterChainMatched {
			continue
		}
		seen = append(seen, fmt.Sprintf("%s%v", m.GetTransportProtocol(), m.GetApplicationProtocols()))
		if m.GetTransportProtocol() == "tls" && contains(m.GetApplicationProtocols(), alpn) {
			found = append(found, fc)
		}
	}
	if len(found) != 1 {
		t.Fatalf("listener %q: %d mTLS chains named %q for ALPN %s, want one (chains: %v)", res.ListenerMatched,
			len(found), res.FilterChainMatched, alpn, seen)
	}
	return found[0]
}

// checkTerminatesIstioMTLS asserts the chain terminates TLS with the workload's Istio certificate
// and requires a client certificate validated against the mesh's roots.
func checkTerminatesIstioMTLS(t *testing.T, fc *listener.FilterChain) {
	t.Helper()
	ts := fc.GetTransportSocket()
	if ts == nil {
		t.Fatalf("inbound chain %q does not terminate TLS", fc.GetName())
	}
	d := &tlsv3.DownstreamTlsContext{}
	if err := ts.GetTypedConfig().UnmarshalTo(d); err != nil {
		t.Fatalf("inbound chain %q: %v", fc.GetName(), err)
	}
	if !d.GetRequireClientCertificate().GetValue() {
		t.Errorf("inbound chain %q does not require a client certificate", fc.GetName())
	}
	s := d.String()
	if !strings.Contains(s, "default") || !strings.Contains(s, "ROOTCA") {
		t.Errorf("inbound chain %q is not Istio mTLS (SDS default/ROOTCA): %s", fc.GetName(), s)
	}
	if names := fc.GetFilterChainMatch().GetServerNames(); len(names) != 0 {
		t.Errorf("inbound chain %q matches SNIs %v; the caller's SNI would have to be among them", fc.GetName(), names)
	}
	t.Logf("inbound chain %q: transport %q, ALPN %v, no SNI match, terminates Istio mTLS, client certificate required",
		fc.GetName(), fc.GetFilterChainMatch().GetTransportProtocol(), fc.GetFilterChainMatch().GetApplicationProtocols())
}

// egressListenPort checks that a sidecar cluster's one endpoint is a's egress gateway Service and
// returns the gateway pods' listener port behind that Service port.
func egressListenPort(t *testing.T, sidecar *simProxy, c *cluster.Cluster, sc scenario) int {
	t.Helper()
	eps := sidecar.endpointsOf(t, c)
	if len(eps) != 1 || !strings.HasPrefix(eps[0], sc.egressService+":") {
		t.Fatalf("cluster %s endpoints %v, want a's egress gateway Service", c.Name, eps)
	}
	_, p, _ := strings.Cut(eps[0], ":")
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("endpoint %s: %v", eps[0], err)
	}
	lport, ok := egressTargetPort[n]
	if !ok {
		t.Fatalf("the sidecar sends to egress port %d, which %s does not expose", n, sc.egressName)
	}
	return lport
}
