{{/*
The worker pod template, shared by the StatefulSet (one pod = one
tensor-parallel group of worker.tp ranks) and the LeaderWorkerSet (one pod =
one rank). (dict "ctx" $ "role" "group|leader|follower")
*/}}
{{- define "aquila.workerPod" -}}
{{- $ := .ctx -}}
{{- $w := $.Values.worker -}}
{{- $cuda := eq $w.device "cuda" -}}
{{- if and $cuda (eq $w.dtype "f32") -}}
{{- fail "worker.device=cuda holds weights in bf16 or f16: set worker.dtype to bf16 (or f16, or auto)" -}}
{{- end -}}
{{- $gpus := ternary $w.multiNode.gpusPerPod $w.tp (ne .role "group") -}}
{{- $vol := $.Values.model.volume -}}
metadata:
  labels:
    {{- include "aquila.labels" $ | nindent 4 }}
    app.kubernetes.io/component: worker
  {{- with $w.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "aquila.serviceAccount" $ }}
  automountServiceAccountToken: false
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # A worker finishes its streams for --shutdown-grace-s after SIGTERM.
  terminationGracePeriodSeconds: {{ add $w.shutdownGraceSeconds 15 }}
  {{- if or $.Values.model.fetchDemo $.Values.model.download.url }}
  initContainers:
    {{- if $.Values.model.fetchDemo }}
    - name: fetch-demo
      image: {{ include "aquila.image" (dict "ctx" $ "cuda" $cuda) }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      command: [/usr/local/bin/aquila]
      args: [fetch-demo]
      env:
        {{- include "aquila.env" $ | nindent 8 }}
        # fetch-demo writes the model under $AQUILA_CACHE_DIR/models.
        - {name: AQUILA_CACHE_DIR, value: /models}
        - {name: PIP_NO_CACHE_DIR, value: "1"}
      {{- include "aquila.securityContext" $ | trim | nindent 6 }}
      volumeMounts:
        - {name: models, mountPath: /models}
        - {name: tmp, mountPath: /tmp}
    {{- end }}
    {{- if $.Values.model.download.url }}
    - name: download-model
      image: {{ $.Values.model.download.image }}
      command: [/bin/sh, -c]
      args:
        - >-
          test -s "$MODEL_PATH" || { mkdir -p "$(dirname "$MODEL_PATH")" &&
          curl -fL --retry 5 -o "$MODEL_PATH.part" "$MODEL_URL" &&
          mv "$MODEL_PATH.part" "$MODEL_PATH"; }
      env:
        - {name: MODEL_URL, value: {{ $.Values.model.download.url | quote }}}
        - {name: MODEL_PATH, value: {{ $.Values.model.path | quote }}}
      {{- include "aquila.securityContext" $ | trim | nindent 6 }}
      volumeMounts:
        - {name: models, mountPath: /models}
    {{- end }}
  {{- end }}
  containers:
    - name: worker
      image: {{ include "aquila.image" (dict "ctx" $ "cuda" $cuda) }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      command: [/usr/local/bin/aquila]
      args:
        - worker
        - --model={{ $.Values.model.path }}
        - --listen=0.0.0.0:{{ $w.ports.grpc }}
        - --metrics-listen=0.0.0.0:{{ $w.ports.metrics }}
        {{- if eq .role "group" }}
        - --tp={{ $w.tp }}
        {{- else }}
        # The LeaderWorkerSet controller sets these three variables.
        - --rank=$(LWS_WORKER_INDEX)
        - --world-size=$(LWS_GROUP_SIZE)
        - --leader=$(LWS_LEADER_ADDRESS):{{ $w.ports.comm }}
        {{- end }}
        {{- if and $cuda (or (gt (int $w.tp) 1) (ne .role "group")) }}
        - --collectives=nccl
        {{- end }}
        - --device={{ $w.device }}
        - --dtype={{ $w.dtype }}
        {{- if kindIs "invalid" $w.kvCacheMib }}
        - --gpu-memory-utilization={{ $w.gpuMemoryUtilization }}
        {{- else }}
        - --kv-cache-mib={{ $w.kvCacheMib }}
        {{- end }}
        - --max-running={{ $w.maxRunning }}
        - --max-batch-tokens={{ $w.maxBatchTokens }}
        - --max-waiting={{ $w.maxWaiting }}
        - --threads={{ $w.threads }}
        - --shutdown-grace-s={{ $w.shutdownGraceSeconds }}
        {{- with $.Values.model.servedName }}
        - --served-model-name={{ . }}
        {{- end }}
        {{- if $.Values.metrics.vllmNames }}
        - --metrics-vllm-names
        {{- end }}
        {{- if $.Values.workerTls.enabled }}
        - --tls-cert=/etc/aquila/worker-tls/tls.crt
        - --tls-key=/etc/aquila/worker-tls/tls.key
        - --tls-client-ca=/etc/aquila/worker-tls/ca.crt
        {{- end }}
        {{- range $w.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        {{- include "aquila.env" $ | nindent 8 }}
        {{- with $w.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - {name: grpc, containerPort: {{ $w.ports.grpc }}, protocol: TCP}
        - {name: metrics, containerPort: {{ $w.ports.metrics }}, protocol: TCP}
        {{- if ne .role "group" }}
        - {name: comm, containerPort: {{ $w.ports.comm }}, protocol: TCP}
        {{- end }}
      {{- if eq .role "follower" }}
      # A follower rank serves no API: its metrics port shows it alive. It
      # exits when its group breaks, and the LeaderWorkerSet restarts the group.
      startupProbe:
        httpGet: {path: /metrics, port: metrics}
        periodSeconds: 5
        failureThreshold: 12
      livenessProbe:
        httpGet: {path: /metrics, port: metrics}
        periodSeconds: 10
        failureThreshold: 3
      {{- else }}
      # The worker API opens once the model is loaded and every rank joined.
      startupProbe:
        {{- include "aquila.grpcProbe" (dict "port" $w.ports.grpc "service" "liveness" "tls" $.Values.workerTls.enabled) | trim | nindent 8 }}
        periodSeconds: 5
        failureThreshold: {{ div $w.startupSeconds 5 }}
      livenessProbe:
        {{- include "aquila.grpcProbe" (dict "port" $w.ports.grpc "service" "liveness" "tls" $.Values.workerTls.enabled) | trim | nindent 8 }}
        periodSeconds: 10
        failureThreshold: 3
      readinessProbe:
        # Not ready while draining: the headless Service drops the pod and
        # the gateways stop sending to it.
        {{- include "aquila.grpcProbe" (dict "port" $w.ports.grpc "service" "readiness" "tls" $.Values.workerTls.enabled) | trim | nindent 8 }}
        periodSeconds: 2
        failureThreshold: 2
      {{- end }}
      resources:
        {{- with $w.resources.requests }}
        requests:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        limits:
          {{- with $w.resources.limits }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
          {{- if $cuda }}
          nvidia.com/gpu: {{ $gpus }}
          {{- end }}
      {{- include "aquila.securityContext" $ | trim | nindent 6 }}
      volumeMounts:
        - {name: models, mountPath: /models, readOnly: true}
        - {name: tmp, mountPath: /tmp}
        {{- if $cuda }}
        - {name: shm, mountPath: /dev/shm}
        {{- end }}
        {{- if $.Values.workerTls.enabled }}
        - {name: worker-tls, mountPath: /etc/aquila/worker-tls, readOnly: true}
        {{- end }}
  volumes:
    - {name: tmp, emptyDir: {}}
    {{- if $cuda }}
    # NCCL's shared-memory transport between the ranks of one pod.
    - {name: shm, emptyDir: {medium: Memory}}
    {{- end }}
    {{- if eq $vol.type "existingClaim" }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ required "model.volume.existingClaim is required with type existingClaim" $vol.existingClaim }}
    {{- else if eq $vol.type "emptyDir" }}
    - {name: models, emptyDir: {}}
    {{- end }}
    {{- if $.Values.workerTls.enabled }}
    - name: worker-tls
      secret: {secretName: {{ required "workerTls.secretName is required with workerTls.enabled" $.Values.workerTls.secretName }}}
    {{- end }}
  {{- with $w.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
