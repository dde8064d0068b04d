package istiocheck

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
	"testing"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	rbacnet "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"istio.io/istio/pilot/test/xdstest"
)

// The simulation package stops at the route: it does not evaluate Envoy's RBAC filters. This is a
// small evaluator for the subset of Envoy RBAC that Istio generates from AuthorizationPolicy
// (principals from the peer certificate, :authority/path headers, destination port, SNI), enough to
// check which peers the ingress gateway admits. Anything it does not know fails the test loudly.

type rbacRequest struct {
	principal string // peer URI SAN, spiffe://...
	authority string
	path      string
	port      int
	sni       string
}

func (r rbacRequest) header(name string) (string, bool) {
	switch strings.ToLower(name) {
	case ":authority", "host":
		return r.authority, true
	case ":path":
		return r.path, true
	case ":method":
		return "GET", true
	}
	return "", false
}

// evalRBAC runs the HTTP RBAC filters of a filter chain in order; returns whether the request
// passes and why.
func evalRBAC(t *testing.T, fc *listener.FilterChain, req rbacRequest) (bool, string) {
	t.Helper()
	hcm := xdstest.ExtractHTTPConnectionManager(t, fc)
	if hcm == nil {
		t.Fatalf("filter chain %q has no HTTP connection manager", fc.GetName())
	}
	var all []*rbacv3.RBAC
	for _, f := range hcm.GetHttpFilters() {
		if f.GetName() != "envoy.filters.http.rbac" {
			continue
		}
		r := &rbachttp.RBAC{}
		if err := f.GetTypedConfig().UnmarshalTo(r); err != nil {
			t.Fatalf("rbac filter: %v", err)
		}
		all = append(all, r.GetRules())
	}
	return evalRules(t, all, req)
}

// evalNetworkRBAC evaluates the network (TCP) RBAC filters of a filter chain, as for a plain-TCP
// connection: only peer identity, destination port and SNI are known.
func evalNetworkRBAC(t *testing.T, fc *listener.FilterChain, req rbacRequest) (bool, string) {
	t.Helper()
	var all []*rbacv3.RBAC
	for _, f := range fc.GetFilters() {
		if f.GetName() != "envoy.filters.network.rbac" {
			continue
		}
		r := &rbacnet.RBAC{}
		if err := f.GetTypedConfig().UnmarshalTo(r); err != nil {
			t.Fatalf("network rbac filter: %v", err)
		}
		all = append(all, r.GetRules())
	}
	return evalRules(t, all, req)
}

func evalRules(t *testing.T, all []*rbacv3.RBAC, req rbacRequest) (bool, string) {
	t.Helper()
	n := 0
	for _, rules := range all {
		if rules == nil {
			continue // shadow-only
		}
		n++
		matched := ""
		names := make([]string, 0, len(rules.GetPolicies()))
		for name := range rules.GetPolicies() {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			if policyMatches(t, rules.GetPolicies()[name], req) {
				matched = name
				break
			}
		}
		switch rules.GetAction() {
		case rbacv3.RBAC_ALLOW:
			if matched == "" {
				return false, fmt.Sprintf("no ALLOW policy matched (policies %v)", names)
			}
		case rbacv3.RBAC_DENY:
			if matched != "" {
				return false, "DENY policy " + matched + " matched"
			}
		default:
			t.Fatalf("rbac action %v not handled", rules.GetAction())
		}
	}
	if n == 0 {
		return true, "no RBAC filter on the chain: everything is admitted"
	}
	return true, "admitted"
}

func policyMatches(t *testing.T, p *rbacv3.Policy, req rbacRequest) bool {
	if p.GetCondition() != nil || p.GetCheckedCondition() != nil {
		t.Fatalf("rbac policy with a CEL condition is not supported by this evaluator")
	}
	perm := false
	for _, x := range p.GetPermissions() {
		if permMatches(t, x, req) {
			perm = true
			break
		}
	}
	if !perm {
		return false
	}
	for _, x := range p.GetPrincipals() {
		if principalMatches(t, x, req) {
			return true
		}
	}
	return false
}

func permMatches(t *testing.T, p *rbacv3.Permission, req rbacRequest) bool {
	switch r := p.GetRule().(type) {
	case *rbacv3.Permission_Any:
		return r.Any
	case *rbacv3.Permission_AndRules:
		for _, x := range r.AndRules.GetRules() {
			if !permMatches(t, x, req) {
				return false
			}
		}
		return true
	case *rbacv3.Permission_OrRules:
		for _, x := range r.OrRules.GetRules() {
			if permMatches(t, x, req) {
				return true
			}
		}
		return false
	case *rbacv3.Permission_NotRule:
		return !permMatches(t, r.NotRule, req)
	case *rbacv3.Permission_Header:
		return headerMatches(t, r.Header, req)
	case *rbacv3.Permission_UrlPath:
		return pathMatches(t, r.UrlPath, req.path)
	case *rbacv3.Permission_DestinationPort:
		return int(r.DestinationPort) == req.port
	case *rbacv3.Permission_RequestedServerName:
		return stringMatches(t, r.RequestedServerName, req.sni)
	}
	js, _ := protojson.Marshal(p)
	t.Fatalf("rbac permission not supported by this evaluator: %s", js)
	return false
}

func principalMatches(t *testing.T, p *rbacv3.Principal, req rbacRequest) bool {
	switch r := p.GetIdentifier().(type) {
	case *rbacv3.Principal_Any:
		return r.Any
	case *rbacv3.Principal_AndIds:
		for _, x := range r.AndIds.GetIds() {
			if !principalMatches(t, x, req) {
				return false
			}
		}
		return true
	case *rbacv3.Principal_OrIds:
		for _, x := range r.OrIds.GetIds() {
			if principalMatches(t, x, req) {
				return true
			}
		}
		return false
	case *rbacv3.Principal_NotId:
		return !principalMatches(t, r.NotId, req)
	case *rbacv3.Principal_Authenticated_:
		if req.principal == "" {
			return false
		}
		if r.Authenticated.GetPrincipalName() == nil {
			return true
		}
		return stringMatches(t, r.Authenticated.GetPrincipalName(), req.principal)
	case *rbacv3.Principal_Header:
		return headerMatches(t, r.Header, req)
	case *rbacv3.Principal_FilterState:
		if r.FilterState.GetKey() == "io.istio.peer_principal" {
			return stringMatches(t, r.FilterState.GetStringMatch(), req.principal)
		}
	}
	js, _ := protojson.Marshal(p)
	t.Fatalf("rbac principal not supported by this evaluator: %s", js)
	return false
}

func headerMatches(t *testing.T, h *route.HeaderMatcher, req rbacRequest) bool {
	v, present := req.header(h.GetName())
	var ok bool
	switch m := h.GetHeaderMatchSpecifier().(type) {
	case *route.HeaderMatcher_PresentMatch:
		ok = present == m.PresentMatch
	case *route.HeaderMatcher_StringMatch:
		ok = present && stringMatches(t, m.StringMatch, v)
	case *route.HeaderMatcher_ExactMatch:
		ok = present && v == m.ExactMatch
	case *route.HeaderMatcher_PrefixMatch:
		ok = present && strings.HasPrefix(v, m.PrefixMatch)
	case *route.HeaderMatcher_SuffixMatch:
		ok = present && strings.HasSuffix(v, m.SuffixMatch)
	case *route.HeaderMatcher_SafeRegexMatch:
		ok = present && regexFull(t, m.SafeRegexMatch.GetRegex(), v)
	default:
		js, _ := protojson.Marshal(h)
		t.Fatalf("rbac header matcher not supported by this evaluator: %s", js)
	}
	if h.GetInvertMatch() {
		return !ok
	}
	return ok
}

func pathMatches(t *testing.T, p *matcher.PathMatcher, path string) bool {
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	return stringMatches(t, p.GetPath(), path)
}

func stringMatches(t *testing.T, m *matcher.StringMatcher, v string) bool {
	if m == nil {
		return true
	}
	cmp := v
	if m.GetIgnoreCase() {
		cmp = strings.ToLower(v)
	}
	lc := func(s string) string {
		if m.GetIgnoreCase() {
			return strings.ToLower(s)
		}
		return s
	}
	switch x := m.GetMatchPattern().(type) {
	case *matcher.StringMatcher_Exact:
		return cmp == lc(x.Exact)
	case *matcher.StringMatcher_Prefix:
		return strings.HasPrefix(cmp, lc(x.Prefix))
	case *matcher.StringMatcher_Suffix:
		return strings.HasSuffix(cmp, lc(x.Suffix))
	case *matcher.StringMatcher_Contains:
		return strings.Contains(cmp, lc(x.Contains))
	case *matcher.StringMatcher_SafeRegex:
		return regexFull(t, x.SafeRegex.GetRegex(), v)
	}
	js, _ := protojson.Marshal(m)
	t.Fatalf("string matcher not supported by this evaluator: %s", js)
	return false
}

func regexFull(t *testing.T, re, v string) bool {
	r, err := regexp.Compile("^(?:" + re + ")$")
	if err != nil {
		t.Fatalf("regex %q: %v", re, err)
	}
	return r.MatchString(v)
}
