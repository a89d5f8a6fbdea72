{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "relayguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name alone when it contains the chart name. */}}
{{- define "relayguard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "relayguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "relayguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relayguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "relayguard.labels" -}}
helm.sh/chart: {{ include "relayguard.chart" . }}
{{ include "relayguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: relayguard
{{- end }}

{{- define "relayguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "relayguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "relayguard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "relayguard.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "relayguard.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "relayguard.usersSecretName" -}}
{{- default (printf "%s-users" (include "relayguard.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Does any listener speak TLS? */}}
{{- define "relayguard.anyTls" -}}
{{- range .Values.listeners }}{{ if ne (default "none" .tls) "none" }}yes{{ end }}{{ end }}
{{- end }}

{{/*
Checks the values that can be wrong in ways Kubernetes or RelayGuard would
only report at run time. Included by the ConfigMap, so every render runs it.
*/}}
{{- define "relayguard.validate" -}}
{{- if not .Values.listeners }}
{{- fail "listeners: at least one listener is required" }}
{{- end }}
{{- $names := dict }}
{{- range .Values.listeners }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString .name)) }}
{{- fail (printf "listeners: name %q must be lowercase letters, digits and '-' (it names a Kubernetes port)" (toString .name)) }}
{{- end }}
{{- if gt (len .name) 15 }}
{{- fail (printf "listeners: name %q is longer than 15 characters (Kubernetes port names are)" .name) }}
{{- end }}
{{- if hasKey $names .name }}
{{- fail (printf "listeners: duplicate name %q" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- if not (has (default "none" .tls) (list "none" "starttls" "implicit")) }}
{{- fail (printf "listeners[%s].tls: %q is not none, starttls or implicit" .name .tls) }}
{{- end }}
{{- if or (not .containerPort) (lt (int .containerPort) 1024) }}
{{- fail (printf "listeners[%s].containerPort must be 1024 or above: the container runs without CAP_NET_BIND_SERVICE (the Service maps port %v onto it)" .name .port) }}
{{- end }}
{{- if eq (int .containerPort) (int $.Values.metrics.port) }}
{{- fail (printf "listeners[%s].containerPort %v is the metrics port" .name .containerPort) }}
{{- end }}
{{- end }}
{{- if and (include "relayguard.anyTls" .) (not .Values.tls.enabled) }}
{{- fail "tls.enabled is false but a listener uses starttls or implicit TLS: enable tls or set those listeners to tls: none" }}
{{- end }}
{{- if and .Values.tls.enabled (or .Values.tls.certificate .Values.tls.key) (or (not .Values.tls.certificate) (not .Values.tls.key)) }}
{{- fail "tls.certificate and tls.key go together" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (or .Values.tls.certificate .Values.tls.existingSecret) }}
{{- fail "tls.certManager.enabled fills the chart's TLS Secret itself: leave tls.certificate, tls.key and tls.existingSecret empty" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef) }}
{{- fail "tls.certManager.issuerRef is required (e.g. {name: letsencrypt, kind: ClusterIssuer})" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.usersFile) }}
{{- fail "auth.enabled needs the users file: set auth.usersFile or auth.existingSecret" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.config.ntlm) }}
{{- fail "auth.config.ntlm is required when auth.enabled (netbios_domain, netbios_computer, dns_domain, dns_computer)" }}
{{- end }}
{{- range .Values.listeners }}
{{- if and (hasKey . "proxyProtocol" | ternary .proxyProtocol $.Values.proxyProtocol.enabled) (not $.Values.proxyProtocol.trustedProxies) }}
{{- fail (printf "listeners[%s]: the PROXY protocol is on but proxyProtocol.trustedProxies is empty: list the load balancers' networks" .name) }}
{{- end }}
{{- end }}
{{- if not (has .Values.service.type (list "LoadBalancer" "NodePort" "ClusterIP")) }}
{{- fail (printf "service.type %q is not LoadBalancer, NodePort or ClusterIP" .Values.service.type) }}
{{- end }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $needed := add (int .Values.shutdown.drainTimeoutSeconds) (int .Values.preStopSleepSeconds) }}
{{- if le $grace (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than shutdown.drainTimeoutSeconds + preStopSleepSeconds (%d), or Kubernetes kills transactions that are still draining" $grace $needed) }}
{{- end }}
{{- if not (has .Values.logFormat (list "json" "text")) }}
{{- fail (printf "logFormat %q is not json or text" .Values.logFormat) }}
{{- end }}
{{- end }}

{{/* The RelayGuard configuration file, as YAML. */}}
{{- define "relayguard.config" -}}
{{- $listeners := list }}
{{- range .Values.listeners }}
{{- $l := dict "name" .name "address" (printf "0.0.0.0:%v" .containerPort) "tls" (default "none" .tls) }}
{{- if hasKey . "requireTlsForAuth" }}
{{- $_ := set $l "require_tls_for_auth" .requireTlsForAuth }}
{{- end }}
{{- $proxy := hasKey . "proxyProtocol" | ternary .proxyProtocol $.Values.proxyProtocol.enabled }}
{{- if $proxy }}
{{- $_ := set $l "proxy_protocol" true }}
{{- $_ := set $l "trusted_proxies" $.Values.proxyProtocol.trustedProxies }}
{{- end }}
{{- $listeners = append $listeners $l }}
{{- end }}
{{- $cfg := dict "hostname" .Values.hostname "listeners" $listeners "backend" .Values.backend }}
{{- if .Values.policy }}
{{- $_ := set $cfg "policy" .Values.policy }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $_ := set $cfg "tls" (dict "certificate" "/etc/relayguard/tls/tls.crt" "key" "/etc/relayguard/tls/tls.key" "reload_interval" .Values.tls.reloadInterval) }}
{{- end }}
{{- if .Values.smtp }}
{{- $_ := set $cfg "smtp" .Values.smtp }}
{{- end }}
{{- if .Values.limits }}
{{- $_ := set $cfg "limits" .Values.limits }}
{{- end }}
{{- if .Values.auth.enabled }}
{{- $auth := deepCopy .Values.auth.config }}
{{- $_ := set $auth "users_file" "/etc/relayguard/auth/users.yaml" }}
{{- $_ := set $cfg "auth" $auth }}
{{- end }}
{{- $_ := set $cfg "shutdown" (dict "drain_timeout" (printf "%ds" (int .Values.shutdown.drainTimeoutSeconds))) }}
{{- $_ := set $cfg "metrics" (dict "address" (printf "0.0.0.0:%v" .Values.metrics.port)) }}
{{- range $k, $v := .Values.extraConfig }}
{{- $_ := set $cfg $k $v }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
