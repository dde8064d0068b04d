{{/* Chart name, truncated to a DNS label. */}}
{{- define "meshbridge-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: the release name, or <release>-<chart> when it does not contain the chart name. */}}
{{- define "meshbridge-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "meshbridge-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshbridge-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshbridge-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshbridge-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: meshbridge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "meshbridge-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshbridge-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "meshbridge-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Where the trust anchor comes from: exactly one of ca.trustAnchor.pem, .existingConfigMap, .existingSecret.
Returns "pem", "configMap" or "secret"; fails otherwise.
*/}}
{{- define "meshbridge-agent.trustAnchorSource" -}}
{{- $ta := .Values.ca.trustAnchor -}}
{{- $given := list -}}
{{- if $ta.pem }}{{ $given = append $given "pem" }}{{ end -}}
{{- if $ta.existingConfigMap }}{{ $given = append $given "configMap" }}{{ end -}}
{{- if $ta.existingSecret }}{{ $given = append $given "secret" }}{{ end -}}
{{- if ne (len $given) 1 -}}
{{- fail "ca.trustAnchor: give exactly one of pem, existingConfigMap or existingSecret (the CA service's root-cert.pem)" -}}
{{- end -}}
{{- first $given -}}
{{- end -}}

{{/* The agent's configuration file (API.md, "Agent configuration file"), from the values. */}}
{{- define "meshbridge-agent.config" -}}
{{- $ca := dict "url" .Values.ca.url "trust_anchor" "/etc/meshbridge/trust-anchor/root-cert.pem" "bootstrap_token_file" "/etc/meshbridge/bootstrap/token" "key_type" .Values.ca.keyType -}}
{{- if not (kindIs "invalid" .Values.ca.renewFraction) }}{{ $_ := set $ca "renew_fraction" .Values.ca.renewFraction }}{{ end -}}
{{- if not (kindIs "invalid" .Values.ca.crlValidity) }}{{ $_ := set $ca "crl_validity" .Values.ca.crlValidity }}{{ end -}}
{{- if not (kindIs "invalid" .Values.ca.caCrl) }}{{ $_ := set $ca "ca_crl" .Values.ca.caCrl }}{{ end -}}
{{- if not (kindIs "invalid" .Values.ca.workloadCertTtl) }}{{ $_ := set $ca "workload_cert_ttl" .Values.ca.workloadCertTtl }}{{ end -}}
{{- $i := .Values.istio -}}
{{- $ingress := dict "selector" $i.ingressGateway.selector "service" $i.ingressGateway.service "service_account" $i.ingressGateway.serviceAccount -}}
{{- if $i.ingressGateway.helmRelease }}{{ $ingress = dict "helm_release" $i.ingressGateway.helmRelease }}{{ end -}}
{{- if $i.ingressGateway.namespace }}{{ $_ := set $ingress "namespace" $i.ingressGateway.namespace }}{{ end -}}
{{- if $i.ingressGateway.address }}{{ $_ := set $ingress "address" $i.ingressGateway.address }}{{ end -}}
{{- if $i.ingressGateway.addresses }}{{ $_ := set $ingress "addresses" $i.ingressGateway.addresses }}{{ end -}}
{{- if not (kindIs "invalid" $i.ingressGateway.port) }}{{ $_ := set $ingress "port" (int $i.ingressGateway.port) }}{{ end -}}
{{- range $value, $key := dict "tcpPort" "tcp_port" "targetPort" "target_port" "tcpTargetPort" "tcp_target_port" }}
{{- $port := get $i.ingressGateway $value }}{{ if not (kindIs "invalid" $port) }}{{ $_ := set $ingress $key (int $port) }}{{ end }}
{{- end -}}
{{- $egress := dict "selector" $i.egressGateway.selector "service" $i.egressGateway.service "service_account" $i.egressGateway.serviceAccount "port" (int $i.egressGateway.port) -}}
{{- if $i.egressGateway.helmRelease }}{{ $egress = dict "helm_release" $i.egressGateway.helmRelease "port" (int $i.egressGateway.port) }}{{ end -}}
{{- if $i.egressGateway.namespace }}{{ $_ := set $egress "namespace" $i.egressGateway.namespace }}{{ end -}}
{{- $istio := dict "namespace" $i.namespace "trust_domain" $i.trustDomain "revision" ($i.revision | default nil) "cluster_domain" $i.clusterDomain "cross_cluster_port" (int $i.crossClusterPort) "cross_cluster_tcp_port" (int ($i.crossClusterTcpPort | default 15444)) "authorization_mode" $i.authorizationMode "ingress_gateway" $ingress "egress_gateway" $egress -}}
{{- if $i.consumerNamespaces }}{{ $_ := set $istio "consumer_namespaces" $i.consumerNamespaces }}{{ end -}}
{{- if $i.istiodAddress }}{{ $_ := set $istio "istiod_address" $i.istiodAddress }}{{ end -}}
{{- $d := .Values.dns -}}
{{- $dns := dict "suffix" $d.suffix "mode" $d.mode "vip_range" $d.vipRange "ttl" (int $d.ttl) "coredns_namespace" $d.corednsNamespace "coredns_configmap" $d.corednsConfigMap "corefile_key" $d.corefileKey -}}
{{- with $d.nodelocalDns }}{{ $nl := dict "bind" .bind }}{{ if .forwardTo }}{{ $_ := set $nl "forward_to" .forwardTo }}{{ end }}{{ $_ := set $dns "nodelocal_dns" $nl }}{{ end -}}
{{- $cfg := dict "cluster" .Values.cluster "ca" $ca "istio" $istio "dns" $dns "exports" .Values.exports "imports" .Values.imports "kubernetes" (dict "field_manager" .Values.kubernetes.fieldManager) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
The gateways the agent checks (meshcheck), as JSON: {"<namespace>": ["<Service>", …]}, from
istio.ingressGateway, istio.egressGateway and every imports[].egress_gateway. A gateway given as a
Helm release (Istio's `gateway` chart) has the release's name as its Service.
*/}}
{{- define "meshbridge-agent.gatewayServices" -}}
{{- $i := .Values.istio -}}
{{- $gateways := list (dict "namespace" $i.ingressGateway.namespace "service" ($i.ingressGateway.helmRelease | default $i.ingressGateway.service)) -}}
{{- $gateways = append $gateways (dict "namespace" $i.egressGateway.namespace "service" ($i.egressGateway.helmRelease | default $i.egressGateway.service)) -}}
{{- range .Values.imports }}{{ with .egress_gateway }}
{{- $gateways = append $gateways (dict "namespace" .namespace "service" (.service | default .helm_release)) -}}
{{- end }}{{ end -}}
{{- $out := dict -}}
{{- range $gateways }}
{{- $ns := .namespace | default $i.namespace -}}
{{- $_ := set $out $ns (append (get $out $ns | default list) .service | uniq) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* istiod's mesh ConfigMap: `istio`, or `istio-<revision>` (istio-discovery's configmap.yaml). */}}
{{- define "meshbridge-agent.meshConfigMap" -}}
{{- if .Values.istio.revision }}istio-{{ .Values.istio.revision }}{{ else }}istio{{ end -}}
{{- end -}}
