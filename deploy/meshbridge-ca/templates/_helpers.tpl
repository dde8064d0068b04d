{{/* Chart name, truncated to a DNS label. */}}
{{- define "meshbridge-ca.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: the release name, or <release>-<chart> when it does not contain the chart name. */}}
{{- define "meshbridge-ca.fullname" -}}
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

{{- define "meshbridge-ca.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshbridge-ca.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshbridge-ca.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshbridge-ca.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: ca-server
app.kubernetes.io/part-of: meshbridge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "meshbridge-ca.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshbridge-ca.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "meshbridge-ca.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The first --server-name: what /data/server-url and clients use. */}}
{{- define "meshbridge-ca.serverName" -}}
{{- default (printf "%s.%s.svc" (include "meshbridge-ca.fullname" .) .Release.Namespace) .Values.serverName -}}
{{- end -}}

{{/* Every --server-name, the primary one first, without duplicates. */}}
{{- define "meshbridge-ca.serverNames" -}}
{{- $svc := include "meshbridge-ca.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list (include "meshbridge-ca.serverName" .) -}}
{{- $names = concat $names .Values.extraServerNames -}}
{{- $names = concat $names (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain)) -}}
{{- toJson (uniq $names) -}}
{{- end -}}

{{/* Secret and key of the passphrase; fails when there is none. */}}
{{- define "meshbridge-ca.passphraseSecret" -}}
{{- if .Values.keyPassphrase.existingSecret -}}
{{- .Values.keyPassphrase.existingSecret -}}
{{- else if .Values.keyPassphrase.generate -}}
{{- printf "%s-key-passphrase" (include "meshbridge-ca.fullname" .) -}}
{{- else -}}
{{- fail "keyPassphrase: give keyPassphrase.existingSecret (a Secret holding the root key's passphrase) or set keyPassphrase.generate: true" -}}
{{- end -}}
{{- end -}}

{{/* Secret of the audit key; fails when there is none. */}}
{{- define "meshbridge-ca.auditKeySecret" -}}
{{- if .Values.auditKey.existingSecret -}}
{{- .Values.auditKey.existingSecret -}}
{{- else if .Values.auditKey.generate -}}
{{- printf "%s-audit-key" (include "meshbridge-ca.fullname" .) -}}
{{- else -}}
{{- fail "auditKey: give auditKey.existingSecret (a Secret holding the audit chain's key) or set auditKey.generate: true" -}}
{{- end -}}
{{- end -}}

{{/* Secret holding the PostgreSQL URL, or "" for the embedded SQLite. */}}
{{- define "meshbridge-ca.databaseSecret" -}}
{{- if .Values.postgresql.existingSecret -}}
{{- .Values.postgresql.existingSecret -}}
{{- else if .Values.postgresql.url -}}
{{- printf "%s-database" (include "meshbridge-ca.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Refuse settings that would corrupt or split the CA: several replicas need PostgreSQL and a shared volume. */}}
{{- define "meshbridge-ca.validate" -}}
{{- if gt (int .Values.replicaCount) 1 -}}
{{- if not (include "meshbridge-ca.databaseSecret" .) -}}
{{- fail (printf "replicaCount is %d but no PostgreSQL is configured: several replicas cannot share the embedded SQLite database. Set postgresql.url or postgresql.existingSecret, or use replicaCount: 1." (int .Values.replicaCount)) -}}
{{- end -}}
{{- if and (not .Values.persistence.existingClaim) (not (has "ReadWriteMany" .Values.persistence.accessModes)) -}}
{{- fail (printf "replicaCount is %d but persistence.accessModes has no ReadWriteMany: every replica mounts /data (root key files, ca.json) read-write. Use accessModes [ReadWriteMany] or an existingClaim that allows it." (int .Values.replicaCount)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where init and serve read the passphrase when keyPassphrase.delivery is file: outside /data. */}}
{{- define "meshbridge-ca.passphraseDir" -}}
/etc/meshbridge/key-passphrase
{{- end -}}

{{/* The --passphrase-file argument for init and serve, or "" when the passphrase comes from the environment. */}}
{{- define "meshbridge-ca.passphraseFileArg" -}}
{{- if eq .Values.keyPassphrase.delivery "file" -}}
--passphrase-file={{ include "meshbridge-ca.passphraseDir" . }}/passphrase
{{- end -}}
{{- end -}}

{{/* Environment shared by init and serve: the PostgreSQL URL when set, and the passphrase with delivery env. */}}
{{- define "meshbridge-ca.env" -}}
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- if eq .Values.keyPassphrase.delivery "env" }}
- name: MESHBRIDGE_CA_KEY_PASSPHRASE
  valueFrom:
    secretKeyRef:
      name: {{ include "meshbridge-ca.passphraseSecret" . }}
      key: {{ .Values.keyPassphrase.key }}
{{- end }}
{{- with include "meshbridge-ca.databaseSecret" . }}
- name: MESHBRIDGE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.postgresql.key }}
{{- end }}
- name: MESHBRIDGE_AUDIT_KEY_FILE
  value: /etc/meshbridge/audit-key/audit-key
{{- end -}}
