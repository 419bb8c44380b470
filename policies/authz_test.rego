package portcullis.authz_test

import rego.v1

import data.portcullis.authz

checkout := "spiffe://pay.example/ns/shop/sa/checkout"

refunds := "spiffe://pay.example/ns/support/sa/refunds"

reporting := "spiffe://pay.example/ns/finance/sa/reporting"

prober := "spiffe://pay.example/ns/monitoring/sa/prober"

frontend := "spiffe://pay.example/ns/shop/sa/frontend"

# Builds the same document shape the proxy builds, so the tests exercise the
# policy against what it will really see.
request(principal, http_method, path, headers) := {
	"attributes": {
		"source": {
			"principal": principal,
			"address": {"socketAddress": {"address": "10.0.0.7", "portValue": 51522}},
		},
		"destination": {"principal": "spiffe://pay.example/ns/pay/sa/payments"},
		"request": {
			"time": "2026-11-25T10:00:00.123Z",
			"http": {
				"id": "test",
				"method": http_method,
				"path": path,
				"host": "payments",
				"scheme": "https",
				"protocol": "HTTP/2",
				"headers": headers,
			},
		},
	},
	"parsed_path": [s | some s in split(split(path, "?")[0], "/"); s != ""],
	"parsed_query": {},
	"source": {
		"spiffe_id": principal,
		"trust_domain": split(trim_prefix(principal, "spiffe://"), "/")[0],
		"path": concat("", ["/", concat("/", array.slice(split(trim_prefix(principal, "spiffe://"), "/"), 1, 100))]),
	},
}

decide(principal, http_method, path, headers) := d if {
	d := authz.allow with input as request(principal, http_method, path, headers)
}

allowed(principal, http_method, path, headers) if {
	decide(principal, http_method, path, headers).allowed == true
}

denied_because(principal, http_method, path, headers, status, reason) if {
	d := decide(principal, http_method, path, headers)
	d.allowed == false
	d.http_status == status
	d.reason == reason
}

# --- every right that is granted ---

test_checkout_creates_payment_with_idempotency_key if {
	allowed(checkout, "POST", "/v1/payments", {"idempotency-key": "k-1", "content-type": "application/json"})
}

test_checkout_reads_payment if {
	allowed(checkout, "GET", "/v1/payments/pay_123", {})
}

test_allow_names_caller_and_request if {
	decide(checkout, "GET", "/v1/payments/pay_123?expand=card", {}).reason == "spiffe://pay.example/ns/shop/sa/checkout may GET /v1/payments/pay_123"
}

test_refunds_refunds_payment if {
	allowed(refunds, "POST", "/v1/payments/pay_123/refunds", {})
}

test_reporting_lists_reports if {
	allowed(reporting, "GET", "/v1/reports", {})
}

test_reporting_reads_nested_report if {
	allowed(reporting, "GET", "/v1/reports/2026/11/daily.csv", {})
}

test_reporting_query_does_not_change_match if {
	allowed(reporting, "GET", "/v1/reports?from=2026-01-01", {})
}

test_prober_healthz if {
	allowed(prober, "GET", "/healthz", {})
}

test_prober_readyz if {
	allowed(prober, "GET", "/readyz", {})
}

test_any_workload_of_trust_domain_healthz if {
	allowed(frontend, "GET", "/healthz", {})
	allowed("spiffe://pay.example/ns/unknown/sa/new-service", "GET", "/healthz", {})
}

# --- important denies ---

test_checkout_create_without_idempotency_key_denied if {
	denied_because(checkout, "POST", "/v1/payments", {}, 400, "POST /v1/payments requires the idempotency-key header")
}

test_checkout_create_with_empty_idempotency_key_denied if {
	denied_because(checkout, "POST", "/v1/payments", {"idempotency-key": ""}, 400, "POST /v1/payments requires the idempotency-key header")
}

test_frontend_has_no_rights if {
	denied_because(frontend, "POST", "/v1/payments", {"idempotency-key": "k-1"}, 403, "spiffe://pay.example/ns/shop/sa/frontend may not POST /v1/payments")
	not allowed(frontend, "GET", "/v1/payments/pay_123", {})
	not allowed(frontend, "GET", "/readyz", {})
}

test_wrong_method_denied if {
	denied_because(checkout, "DELETE", "/v1/payments/pay_123", {}, 403, "spiffe://pay.example/ns/shop/sa/checkout may not DELETE /v1/payments/pay_123")
	not allowed(reporting, "POST", "/v1/reports", {})
	not allowed(refunds, "GET", "/v1/payments/pay_123/refunds", {})
}

test_wrong_workload_denied if {
	not allowed(refunds, "POST", "/v1/payments", {"idempotency-key": "k-1"})
	not allowed(checkout, "POST", "/v1/payments/pay_123/refunds", {})
	not allowed(reporting, "GET", "/v1/payments/pay_123", {})
	not allowed(checkout, "GET", "/v1/reports", {})
}

test_single_segment_wildcard_does_not_span_segments if {
	not allowed(checkout, "GET", "/v1/payments/pay_123/refunds", {})
	not allowed(checkout, "GET", "/v1/payments", {})
	not allowed(refunds, "POST", "/v1/payments/refunds", {})
}

test_only_healthz_for_any_workload if {
	not allowed("spiffe://pay.example/ns/unknown/sa/new-service", "GET", "/readyz", {})
	not allowed("spiffe://pay.example/ns/unknown/sa/new-service", "GET", "/v1/payments/pay_123", {})
}

test_unknown_caller_denied_with_reason if {
	denied_because("spiffe://pay.example/ns/unknown/sa/new-service", "GET", "/v1/reports", {}, 403, "spiffe://pay.example/ns/unknown/sa/new-service may not GET /v1/reports")
}

test_other_trust_domain_denied if {
	denied_because("spiffe://evil.example/ns/shop/sa/checkout", "GET", "/healthz", {}, 403, "spiffe://evil.example/ns/shop/sa/checkout is not in trust domain pay.example")
	not allowed("spiffe://evil.example/ns/shop/sa/checkout", "GET", "/v1/payments/pay_123", {})
}

test_malformed_input_denied if {
	d := authz.allow with input as {}
	d.allowed == false
}
