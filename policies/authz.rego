# Authorization for the payments service.
#
# Who may call what lives in data.json (data.access), so granting a workload a
# new right is a data change reviewed as such, not a logic change. Path
# patterns are matched segment by segment against input.parsed_path: `*` is
# exactly one segment, a trailing `**` is one or more. The proxy has already
# normalised the path (dot segments, duplicate slashes, encoded slashes are
# refused before policy), so no traversal handling is needed here.
package portcullis.authz

import rego.v1

# Reached only when the input is malformed (e.g. no principal), because the
# else chain below always produces a value for a well-formed input.
default allow := {
	"allowed": false,
	"http_status": 403,
	"reason": "request lacks the attributes this policy needs",
}

allow := deny(sprintf("%s is not in trust domain %s", [caller, data.access.trust_domain])) if {
	input.source.trust_domain != data.access.trust_domain
} else := {"allowed": true, "reason": sprintf("%s may %s %s", [caller, method, request_path])} if {
	granted
} else := {
	"allowed": false,
	# The caller has the right but sent an incomplete request: a client error
	# it can fix, not a missing permission.
	"http_status": 400,
	"reason": sprintf("%s %s requires the %s header", [method, request_path, concat(", ", sort(missing))]),
} if {
	count(missing) > 0
} else := deny(sprintf("%s may not %s %s", [caller, method, request_path]))

# The `some` loops live in helper rules rather than in the `else` bodies:
# regorus 0.14.1's RVM skips an `else` that follows a body whose `some`
# failed, and this shape gives it nothing to skip.
#
# `granted` walks the grants in data itself rather than `matching_grants`,
# and checks the headers inline rather than through `missing_headers`: an
# allowed request then builds no set of grant objects and calls no
# function, which took a quarter off the instructions of an uncached
# decision (docs/performance.md). The two remain for the 400's reason.
granted if {
	some grant in data.access.workloads[caller]
	grant.method == method
	path_matches(split(trim_prefix(grant.path, "/"), "/"), input.parsed_path)
	every h in object.get(grant, "require_headers", []) {
		object.get(input.attributes.request.http.headers, h, "") != ""
	}
}

granted if {
	input.source.trust_domain == data.access.trust_domain
	some grant in data.access.any_workload
	grant.method == method
	path_matches(split(trim_prefix(grant.path, "/"), "/"), input.parsed_path)
	every h in object.get(grant, "require_headers", []) {
		object.get(input.attributes.request.http.headers, h, "") != ""
	}
}

missing contains h if {
	some grant in matching_grants
	some h in missing_headers(grant)
}

deny(reason) := {"allowed": false, "http_status": 403, "reason": reason}

caller := input.attributes.source.principal

method := input.attributes.request.http.method

# The reason names the path without its query string: queries may carry
# identifiers that do not belong in logs.
request_path := split(input.attributes.request.http.path, "?")[0]

grants contains grant if {
	some grant in data.access.workloads[caller]
}

grants contains grant if {
	input.source.trust_domain == data.access.trust_domain
	some grant in data.access.any_workload
}

matching_grants contains grant if {
	some grant in grants
	grant.method == method
	path_matches(split(trim_prefix(grant.path, "/"), "/"), input.parsed_path)
}

# A segment matches when the pattern's is `*` or the same string. Written as
# set membership, not as a helper function: the RVM's function calls cost
# more than the comparison they wrap, and with one an uncached decision took
# 20% more instructions (docs/performance.md).
path_matches(pattern, segments) if {
	count(pattern) == count(segments)
	every i, p in pattern {
		p in {"*", segments[i]}
	}
}

path_matches(pattern, segments) if {
	n := count(pattern) - 1
	pattern[n] == "**"
	count(segments) > n
	every i, p in array.slice(pattern, 0, n) {
		p in {"*", segments[i]}
	}
}

missing_headers(grant) := {h |
	some h in object.get(grant, "require_headers", [])
	object.get(input.attributes.request.http.headers, h, "") == ""
}
