package istiocheck

import (
	"os"
	"strings"
	"testing"

	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/pkg/simulation"
)

// TestPolicyVerdicts asks one exporter's ingress gateway, as Istio builds it from the rendered
// objects in MESHBRIDGE_VERDICT_DIR (with b's base objects: gateway Service/Pod, destinations),
// whom it admits for one exported HTTP host: an mTLS call with SNI = Host = the host on the
// cross-cluster port must select a chain that routes to the destination, and the RBAC filters
// Istio generated on that chain must admit every principal in MESHBRIDGE_VERDICT_ADMIT and deny
// every one in MESHBRIDGE_VERDICT_DENY (comma-separated SPIFFE URIs).
//
// The RBAC verdict is evalRBAC (rbac_test.go), our evaluator of Envoy's RBAC config: a stand-in
// for Envoy's engine, which does not run here; the config it evaluates is Istio's own output.
func TestPolicyVerdicts(t *testing.T) {
	dir := os.Getenv("MESHBRIDGE_VERDICT_DIR")
	host := os.Getenv("MESHBRIDGE_VERDICT_HOST")
	if dir == "" || host == "" {
		t.Fatal("set MESHBRIDGE_VERDICT_DIR and MESHBRIDGE_VERDICT_HOST")
	}
	port := envInt(t, "MESHBRIDGE_VERDICT_PORT", 15443)
	trustDomain := envOr("MESHBRIDGE_VERDICT_TRUST_DOMAIN", "b.mesh")
	admit := splitList(os.Getenv("MESHBRIDGE_VERDICT_ADMIT"))
	deny := splitList(os.Getenv("MESHBRIDGE_VERDICT_DENY"))
	if len(admit)+len(deny) == 0 {
		t.Fatal("nothing to judge: set MESHBRIDGE_VERDICT_ADMIT and/or MESHBRIDGE_VERDICT_DENY")
	}

	c := newSimCluster(t, "exporter", dir, baseB, baseIstioB, trustDomain)
	ingress := c.proxy(t, model.Router, "istio-system", "10.2.0.30",
		map[string]string{"app": "istio-ingressgateway", "istio": "ingressgateway"}, "1.30.3")
	res := ingress.sim.Run(simulation.Call{
		Port: port, Protocol: simulation.HTTP, TLS: simulation.MTLS, Sni: host, HostHeader: host,
		CallMode: simulation.CallModeGateway,
	})
	if res.Error != nil || !strings.HasPrefix(res.ClusterMatched, "outbound|") {
		ingress.dump(t, "exporter ingress")
		t.Fatalf("mTLS SNI/Host %s on %d: err=%v cluster %q (listener %q, chain %q)", host, port, res.Error,
			res.ClusterMatched, res.ListenerMatched, res.FilterChainMatched)
	}
	fc := ingress.filterChainFor(t, res, host)
	req := rbacRequest{authority: host, path: "/", port: port, sni: host}
	for _, p := range admit {
		req.principal = p
		if ok, why := evalRBAC(t, fc, req); !ok {
			t.Errorf("DENIED %s for %s (want admitted): %s", p, host, why)
		} else {
			t.Logf("admitted %s for %s", p, host)
		}
	}
	for _, p := range deny {
		req.principal = p
		if ok, why := evalRBAC(t, fc, req); ok {
			t.Errorf("ADMITTED %s for %s (want denied): %s", p, host, why)
		} else {
			t.Logf("denied %s for %s: %s", p, host, why)
		}
	}
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}
