package istiocheck

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"

	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/pkg/simulation"
	"istio.io/istio/pilot/test/xdstest"
)

// TestMultiExport (issue 13 items 4 and 5) simulates cluster a's side of imports served by several
// exporters and several gateway addresses, over what the agent renders
// (tests/support/multiscenario.py): a sidecar call through a's egress gateway must reach the
// `.remote` cluster whose endpoints are every exporter address with the priority its exporter's
// rank gives, with outlier detection on the cluster (no failover without it) and every exporter's
// ingress identity pinned.
//
// MESHBRIDGE_MULTI_EXPECT: "host=addr:port@priority,...;host=..." (the endpoints, any order)
// MESHBRIDGE_MULTI_SANS:   "host=san,san;host=..." (the identities each host's egress cluster pins)
// MESHBRIDGE_MULTI_REMOTE: "host=exported;..." (a host served under an alias, issue 13 item 5):
// the egress gateway must send the exported name on, as SNI and authority, the two things the
// exporter's ingress routes on (TestSimulation step 3).
// MESHBRIDGE_MULTI_EGRESS_LOCALITY: "region[/zone]" of a's egress gateway (locality failover).
// MESHBRIDGE_SIM_A_DIR:    a's rendered objects.
// multiBed is cluster a of the multi-exporter scenario: its egress gateway and a bookinfo sidecar,
// with the expected endpoints (MESHBRIDGE_MULTI_EXPECT) and pinned identities (MESHBRIDGE_MULTI_SANS).
type multiBed struct {
	sc       scenario
	egressGW *simProxy
	sidecar  *simProxy
	expect   map[string][]string
	sans     map[string][]string
	hosts    []string // expect's hosts, sorted
}

func newMultiBed(t *testing.T) *multiBed {
	t.Helper()
	sc := loadScenario(t)
	b := &multiBed{
		sc:     sc,
		expect: parseMulti(t, os.Getenv("MESHBRIDGE_MULTI_EXPECT")),
		sans:   parseMulti(t, os.Getenv("MESHBRIDGE_MULTI_SANS")),
	}
	if len(b.expect) == 0 {
		t.Fatal("MESHBRIDGE_MULTI_EXPECT is empty")
	}
	a := newSimCluster(t, "a", sc.aDir, baseA(t, sc), "", "a.mesh")
	b.egressGW = a.proxy(t, model.Router, "istio-system", "10.1.0.20", sc.egressLabels, sc.istioVersion)
	if loc := os.Getenv("MESHBRIDGE_MULTI_EGRESS_LOCALITY"); loc != "" {
		b.egressGW = a.proxyAt(t, b.egressGW.proxy, loc)
	}
	b.sidecar = a.proxy(t, model.SidecarProxy, "bookinfo", "10.1.1.5", map[string]string{"app": "productpage"}, sc.istioVersion)
	for h := range b.expect {
		b.hosts = append(b.hosts, h)
	}
	sort.Strings(b.hosts)
	return b
}

func TestMultiExport(t *testing.T) {
	bed := newMultiBed(t)
	sc, egressGW, sidecar, expect, sans, hosts := bed.sc, bed.egressGW, bed.sidecar, bed.expect, bed.sans, bed.hosts
	remote := parseMulti(t, os.Getenv("MESHBRIDGE_MULTI_REMOTE"))
	for _, host := range hosts {
		host := host
		t.Run(host, func(t *testing.T) {
			res := sidecar.sim.Run(simulation.Call{
				Address: serviceEntryVIP(t, sc.aDir, host), Port: sc.port, Protocol: simulation.HTTP, HostHeader: host,
				CallMode: simulation.CallModeOutbound,
			})
			if res.Error != nil {
				sidecar.dump(t, "sidecar a")
				t.Fatalf("sidecar: %v", res.Error)
			}
			sni := checkIstioMTLS(t, sidecar.cluster(t, res.ClusterMatched), "", nil)
			after := sidecar.hostAfter(t, res, host)
			res = egressGW.sim.Run(simulation.Call{
				Port: egressTargetPort[443], Protocol: simulation.HTTP, TLS: simulation.MTLS, Sni: sni, HostHeader: after,
				CallMode: simulation.CallModeGateway,
			})
			want := fmt.Sprintf("outbound|%d||%s", sc.port, host)
			if res.Error != nil || res.ClusterMatched != want {
				egressGW.dump(t, "egress a")
				t.Fatalf("egress: err=%v cluster %q, want %q", res.Error, res.ClusterMatched, want)
			}
			c := egressGW.cluster(t, want)
			exported := host
			if r, ok := remote[host]; ok {
				exported = r[0]
			}
			checkIstioMTLS(t, c, exported, sans[host])
			if onward, wantHost := egressGW.hostAfter(t, res, after), fmt.Sprintf("%s:%d", exported, sc.port); onward != wantHost {
				t.Errorf("egress gateway sends Host %q on to the exporter, want %q", onward, wantHost)
			}
			checkOutlierDetection(t, c)
			got := egressGW.prioritizedEndpoints(t, c)
			sort.Strings(got)
			wantEPs := append([]string(nil), expect[host]...)
			sort.Strings(wantEPs)
			if strings.Join(got, " ") != strings.Join(wantEPs, " ") {
				t.Errorf("cluster %s (%s): endpoints@priority %v, want %v", c.Name, c.GetType(), got, wantEPs)
			}
			t.Logf("%s: cluster %s type %s, SNI and Host on to the exporter %s, endpoints@priority %v, outlier detection %v",
				host, c.Name, clusterKind(c), exported, got, c.GetOutlierDetection())
		})
	}
}

// proxyAt rebuilds a proxy's simulation as if it ran at locality "region[/zone[/subzone]]" (what
// istiod takes from the node's topology labels; the fake discovery server leaves it empty).
func (c *simCluster) proxyAt(t *testing.T, p *model.Proxy, locality string) *simProxy {
	t.Helper()
	parts := append(strings.Split(locality, "/"), "", "")
	p.Locality = &core.Locality{Region: parts[0], Zone: parts[1], SubZone: parts[2]}
	p = c.fake.SetupProxy(p)
	sim := simulation.NewSimulation(t, c.fake, p)
	xdstest.ValidateClusters(t, sim.Clusters)
	return &simProxy{c: c, proxy: p, sim: sim}
}

// parseMulti reads "key=v,v;key=v".
func parseMulti(t *testing.T, s string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, part := range strings.Split(s, ";") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			t.Fatalf("bad entry %q (want host=a,b)", part)
		}
		out[strings.TrimSpace(k)] = strings.Split(v, ",")
	}
	return out
}

func clusterKind(c *cluster.Cluster) string {
	if c.GetType() == cluster.Cluster_EDS {
		return "EDS"
	}
	return c.GetType().String()
}

// checkOutlierDetection asserts what render/failover.py asks of Istio (applyOutlierDetection):
// gateway errors eject after 3, 5xx from the destination never do, an exporter may be ejected whole.
func checkOutlierDetection(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	od := c.GetOutlierDetection()
	switch {
	case od == nil:
		t.Errorf("cluster %s: no outlier detection (Istio applies no failover without it)", c.Name)
	case od.GetConsecutiveGatewayFailure().GetValue() != 3 || od.GetEnforcingConsecutiveGatewayFailure().GetValue() != 100:
		t.Errorf("cluster %s: gateway failures %v enforced %v, want 3 / 100", c.Name,
			od.GetConsecutiveGatewayFailure(), od.GetEnforcingConsecutiveGatewayFailure())
	case od.GetConsecutive_5Xx() == nil || od.GetConsecutive_5Xx().GetValue() != 0 || od.GetEnforcingConsecutive_5Xx().GetValue() != 0:
		t.Errorf("cluster %s: consecutive 5xx %v enforced %v, want 0 / 0 (Envoy's default 5 would eject on the destination's 500s)",
			c.Name, od.GetConsecutive_5Xx(), od.GetEnforcingConsecutive_5Xx())
	case od.GetMaxEjectionPercent().GetValue() != 100:
		t.Errorf("cluster %s: max ejection %v, want 100", c.Name, od.GetMaxEjectionPercent())
	}
	if p := c.GetCommonLbConfig().GetHealthyPanicThreshold(); p == nil || p.GetValue() != 0 {
		t.Errorf("cluster %s: healthy panic threshold %v, want 0 (never send to an ejected exporter)", c.Name, p)
	}
}

// prioritizedEndpoints returns "address:port@priority" for a cluster, from EDS or the inline load
// assignment (a DNS cluster's endpoints are names).
func (p *simProxy) prioritizedEndpoints(t *testing.T, c *cluster.Cluster) []string {
	t.Helper()
	cla := c.GetLoadAssignment()
	if c.GetType() == cluster.Cluster_EDS {
		cla = nil
		for _, l := range p.c.fake.Endpoints(p.proxy) {
			if l.ClusterName == c.Name {
				cla = l
			}
		}
	}
	if cla == nil {
		t.Fatalf("cluster %s: no load assignment", c.Name)
	}
	return describeAssignment(cla)
}

func describeAssignment(cla *endpoint.ClusterLoadAssignment) []string {
	var out []string
	for _, group := range cla.GetEndpoints() {
		for _, lb := range group.GetLbEndpoints() {
			sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
			out = append(out, fmt.Sprintf("%s:%d@%d", sa.GetAddress(), sa.GetPortValue(), group.GetPriority()))
		}
	}
	return out
}

// TestMultiExportEndToEnd: the same imports exported end to end (exports[].mode: end-to-end) by b
// and c. a's sidecar originates Istio mTLS with the one SNI of the name (the same at every
// exporter) and pins every exporter's workload identities; a's egress gateway forwards that SNI
// unopened (no transport socket on the forwarding cluster) to every address of every exporter,
// with the Envoy priority of its exporter's rank and outlier detection (eject a dead exporter).
//
// Env: MESHBRIDGE_SIM_A_DIR; MESHBRIDGE_MULTI_EXPECT (host=address:port@priority,…;…),
// MESHBRIDGE_MULTI_SANS (host=spiffe ids of the destination workloads), MESHBRIDGE_MULTI_SNI (host=sni).
func TestMultiExportEndToEnd(t *testing.T) {
	bed := newMultiBed(t)
	sc, egressGW, sidecar, expect, sans, hosts := bed.sc, bed.egressGW, bed.sidecar, bed.expect, bed.sans, bed.hosts
	snis := parseMulti(t, os.Getenv("MESHBRIDGE_MULTI_SNI"))
	for _, host := range hosts {
		host := host
		t.Run(host, func(t *testing.T) {
			res := sidecar.sim.Run(simulation.Call{
				Address: serviceEntryVIP(t, sc.aDir, host), Port: sc.port, Protocol: simulation.HTTP,
				HostHeader: fmt.Sprintf("%s:%d", host, sc.port), CallMode: simulation.CallModeOutbound,
			})
			if res.Error != nil {
				sidecar.dump(t, "sidecar a")
				t.Fatalf("sidecar: %v", res.Error)
			}
			c := sidecar.cluster(t, res.ClusterMatched)
			sni := checkIstioMTLS(t, c, snis[host][0], sans[host])
			lport := egressListenPort(t, sidecar, c, sc)
			res = egressGW.sim.Run(simulation.Call{Port: lport, Protocol: simulation.TCP, TLS: simulation.MTLS, Sni: sni,
				CallMode: simulation.CallModeGateway})
			if res.Error != nil {
				egressGW.dump(t, "egress a")
				t.Fatalf("egress: SNI %s on %d: %v", sni, lport, res.Error)
			}
			fwd := egressGW.cluster(t, res.ClusterMatched)
			if !strings.HasSuffix(fwd.Name, "||"+sni) {
				t.Errorf("egress a forwards SNI %s to cluster %s, want the forwarding host named by the SNI", sni, fwd.Name)
			}
			if fwd.GetTransportSocket() != nil || len(fwd.GetTransportSocketMatches()) > 0 {
				t.Errorf("cluster %s adds TLS: the caller's mTLS must pass unopened", fwd.Name)
			}
			checkOutlierDetection(t, fwd)
			got := egressGW.prioritizedEndpoints(t, fwd)
			sort.Strings(got)
			want := append([]string(nil), expect[host]...)
			sort.Strings(want)
			if strings.Join(got, " ") != strings.Join(want, " ") {
				t.Errorf("cluster %s (%s): endpoints@priority %v, want %v", fwd.Name, clusterKind(fwd), got, want)
			}
			t.Logf("%s: SNI %s pinned %v; egress forwards to %s (%s), endpoints@priority %v",
				host, sni, sans[host], fwd.Name, clusterKind(fwd), got)
		})
	}
}
