package istiocheck

import (
	"fmt"
	"testing"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/pkg/simulation"
)

// TestDataplane (issue 11, item 11) simulates, over what the agents render (tests/e2e/dataplane_fixture.py),
// a in a.mesh importing from b in b.mesh:
//   - ratings.bookinfo (HTTP 9080): only b's ingress route retries (Istio's default policy), the
//     routes of a's sidecar and egress gateway have none; b's ingress rewrites the Host to
//     ratings.bookinfo.svc.cluster.local:9080;
//   - pg.data with two TCP ports (5432, 5433): each crosses both gateways on its own SNI
//     (<port>.pg.data.remote) to its own port of pg.data.svc.cluster.local, a's egress gateway dials
//     the TCP port b published (15444, not a's own 16000), and b's policy admits only a.
const dataplaneBaseB = `
apiVersion: v1
kind: Service
metadata: {name: pg, namespace: data, labels: {app: pg}}
spec:
  clusterIP: 10.96.3.10
  selector: {app: pg}
  ports:
  - {name: tcp-pg, port: 5432, targetPort: 5432, protocol: TCP}
  - {name: tcp-pg-replica, port: 5433, targetPort: 5433, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata: {name: pg-0, namespace: data, labels: {app: pg}}
spec: {serviceAccountName: pg, containers: [{name: pg, image: postgres}]}
status: {phase: Running, podIP: 10.2.3.5, podIPs: [{ip: 10.2.3.5}], conditions: [{type: Ready, status: "True"}]}
`

const (
	dpHost      = "ratings.bookinfo.remote"
	dpPort      = 9080
	dpTCPHost   = "pg.data.remote"
	dpTCPDest   = "pg.data.svc.cluster.local"
	dpRatings   = "ratings.bookinfo.svc.cluster.local"
	dpGateway   = "198.51.100.20"
	dpTCPGwPort = 15444 // what b publishes as gateway.tcp_port (a's own cross_cluster_tcp_port is 16000)
)

// matchedRoute returns the Envoy route a simulated call matched.
func (p *simProxy) matchedRoute(t *testing.T, res simulation.Result) *route.Route {
	t.Helper()
	for _, rc := range p.sim.Routes {
		if rc.GetName() != res.RouteConfigMatched {
			continue
		}
		for _, vh := range rc.GetVirtualHosts() {
			if vh.GetName() != res.VirtualHostMatched {
				continue
			}
			for _, r := range vh.GetRoutes() {
				if r.GetName() == res.RouteMatched {
					return r
				}
			}
		}
	}
	t.Fatalf("route %q (vhost %q, config %q) not found", res.RouteMatched, res.VirtualHostMatched, res.RouteConfigMatched)
	return nil
}

func TestDataplane(t *testing.T) {
	sc := loadScenario(t)
	a := newSimCluster(t, "a", sc.aDir, baseA(t, sc), "", "a.mesh")
	b := newSimCluster(t, "b", sc.bDir, baseB+"\n---\n"+dataplaneBaseB, "", "b.mesh")
	egressGW := a.proxy(t, model.Router, "istio-system", "10.1.0.20", sc.egressLabels, sc.istioVersion)
	sidecar := a.proxy(t, model.SidecarProxy, "bookinfo", "10.1.1.5", map[string]string{"app": "productpage"}, sc.istioVersion)
	ingressGW := b.proxy(t, model.Router, "istio-system", "10.2.0.30",
		map[string]string{"app": "istio-ingressgateway", "istio": "ingressgateway"}, sc.istioVersion)
	ingressSAN := "spiffe://b.mesh/ns/istio-system/sa/istio-ingressgateway-service-account"

	t.Run("HTTP: one hop retries, and b's ingress rewrites the Host to the destination Service", func(t *testing.T) {
		res := sidecar.sim.Run(simulation.Call{
			Address: serviceEntryVIP(t, sc.aDir, dpHost), Port: dpPort, Protocol: simulation.HTTP, HostHeader: dpHost,
			CallMode: simulation.CallModeOutbound,
		})
		if res.Error != nil {
			sidecar.dump(t, "sidecar a")
			t.Fatalf("sidecar: %v", res.Error)
		}
		if rp := sidecar.matchedRoute(t, res).GetRoute().GetRetryPolicy(); rp != nil {
			t.Errorf("a's sidecar route %s retries (%v): only b's ingress should", res.RouteMatched, rp)
		}
		sni := checkIstioMTLS(t, sidecar.cluster(t, res.ClusterMatched), "", nil)
		host := sidecar.hostAfter(t, res, dpHost)

		res = egressGW.sim.Run(simulation.Call{
			Port: egressTargetPort[443], Protocol: simulation.HTTP, TLS: simulation.MTLS, Sni: sni, HostHeader: host,
			CallMode: simulation.CallModeGateway,
		})
		if res.Error != nil {
			egressGW.dump(t, "egress a")
			t.Fatalf("egress: %v", res.Error)
		}
		if rp := egressGW.matchedRoute(t, res).GetRoute().GetRetryPolicy(); rp != nil {
			t.Errorf("a's egress route %s retries (%v): only b's ingress should", res.RouteMatched, rp)
		}
		sni = checkIstioMTLS(t, egressGW.cluster(t, res.ClusterMatched), dpHost, []string{ingressSAN})
		host = egressGW.hostAfter(t, res, host)

		res = ingressGW.sim.Run(simulation.Call{
			Port: 15443, Protocol: simulation.HTTP, TLS: simulation.MTLS, Sni: sni, HostHeader: host,
			CallMode: simulation.CallModeGateway,
		})
		want := fmt.Sprintf("outbound|%d||%s", dpPort, dpRatings)
		if res.Error != nil || res.ClusterMatched != want {
			ingressGW.dump(t, "ingress b")
			t.Fatalf("ingress: err=%v cluster %q, want %q", res.Error, res.ClusterMatched, want)
		}
		rp := ingressGW.matchedRoute(t, res).GetRoute().GetRetryPolicy()
		if rp == nil || rp.GetNumRetries().GetValue() != 2 || rp.GetRetryOn() == "" {
			t.Errorf("b's ingress route %s: retry policy %v, want Istio's default (2 retries)", res.RouteMatched, rp)
		}
		after := ingressGW.hostAfter(t, res, host)
		if wantHost := fmt.Sprintf("%s:%d", dpRatings, dpPort); after != wantHost {
			t.Errorf("b's ingress forwards Host %q to %s, want %q", after, want, wantHost)
		}
		t.Logf("Host %s -> %s at b's ingress (route %s, retries %d on %q)", host, after, res.RouteMatched,
			rp.GetNumRetries().GetValue(), rp.GetRetryOn())
	})

	vip := serviceEntryVIP(t, sc.aDir, dpTCPHost)
	for _, port := range []int{5432, 5433} {
		port := port
		wantSNI := fmt.Sprintf("%d.%s", port, dpTCPHost)
		t.Run(fmt.Sprintf("TCP %d crosses on SNI %s to port %d", port, wantSNI, port), func(t *testing.T) {
			res := sidecar.sim.Run(simulation.Call{
				Address: vip, Port: port, Protocol: simulation.TCP, CallMode: simulation.CallModeOutbound,
			})
			if res.Error != nil {
				sidecar.dump(t, "sidecar a")
				t.Fatalf("sidecar TCP %s:%d: %v", vip, port, res.Error)
			}
			_, _, h, egressPort := model.ParseSubsetKey(res.ClusterMatched)
			if string(h) != sc.egressService {
				t.Fatalf("sidecar TCP %s:%d: cluster %q, want one of %s", vip, port, res.ClusterMatched, sc.egressService)
			}
			checkIstioMTLS(t, sidecar.cluster(t, res.ClusterMatched), wantSNI, nil)

			res = egressGW.sim.Run(simulation.Call{
				Port: egressTargetPort[egressPort], Protocol: simulation.TCP, TLS: simulation.MTLS, Sni: wantSNI,
				CallMode: simulation.CallModeGateway,
			})
			want := fmt.Sprintf("outbound|%d||%s", port, dpTCPHost)
			if res.Error != nil || res.ClusterMatched != want {
				egressGW.dump(t, "egress a")
				t.Fatalf("egress SNI %s: err=%v cluster %q, want %q (chain %q)", wantSNI, res.Error, res.ClusterMatched,
					want, res.FilterChainMatched)
			}
			c := egressGW.cluster(t, res.ClusterMatched)
			checkIstioMTLS(t, c, wantSNI, []string{ingressSAN})
			wantEP := fmt.Sprintf("%s:%d", dpGateway, dpTCPGwPort)
			if eps := egressGW.endpointsOf(t, c); len(eps) != 1 || eps[0] != wantEP {
				t.Errorf("cluster %s endpoints %v, want [%s] (b's published TCP port)", c.Name, eps, wantEP)
			}

			res = ingressGW.sim.Run(simulation.Call{
				Port: dpTCPGwPort, Protocol: simulation.TCP, TLS: simulation.MTLS, Sni: wantSNI,
				CallMode: simulation.CallModeGateway,
			})
			want = fmt.Sprintf("outbound|%d||%s", port, dpTCPDest)
			if res.Error != nil || res.ClusterMatched != want {
				ingressGW.dump(t, "ingress b")
				t.Fatalf("ingress SNI %s: err=%v cluster %q, want %q (chain %q)", wantSNI, res.Error, res.ClusterMatched,
					want, res.FilterChainMatched)
			}
			fc := ingressGW.filterChainFor(t, res, wantSNI)
			req := rbacRequest{port: dpTCPGwPort, sni: wantSNI,
				principal: "spiffe://a.mesh/ns/istio-system/sa/istio-egressgateway-service-account"}
			if ok, why := evalNetworkRBAC(t, fc, req); !ok {
				t.Errorf("b's ingress TCP chain for %s denies the consumer: %s", wantSNI, why)
			}
			req.principal = "spiffe://stranger.mesh/ns/istio-system/sa/istio-egressgateway-service-account"
			if ok, why := evalNetworkRBAC(t, fc, req); ok {
				t.Errorf("b's ingress TCP chain for %s admits a non-consumer (%s)", wantSNI, why)
			}
			t.Logf("TCP %s:%d -> SNI %s -> %s:%d -> %s", vip, port, wantSNI, dpGateway, dpTCPGwPort, res.ClusterMatched)
		})
	}

	t.Run("TCP: the bare host is no SNI of a name with several TCP ports", func(t *testing.T) {
		for _, p := range []*simProxy{egressGW, ingressGW} {
			res := p.sim.Run(simulation.Call{
				Port: 15444, Protocol: simulation.TCP, TLS: simulation.MTLS, Sni: dpTCPHost, CallMode: simulation.CallModeGateway,
			})
			if res.Error == nil {
				t.Errorf("%s: SNI %s reached %q, want refused", p.proxy.ID, dpTCPHost, res.ClusterMatched)
			}
		}
	})
}
