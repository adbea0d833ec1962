package cellos

import (
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// decodeStrict is the fast path of ParseDocument: one pass over the bytes that decodes a
// document into doc exactly as encoding/json would, while enforcing the strict rules of
// checkShape (keys known and in their exact case, no duplicate keys however they are escaped, a
// user with both ids, nothing after the document).
//
// It reports false for anything it does not accept: a broken rule, malformed JSON, a value of the
// wrong type, or a number encoding/json would refuse for its field. It never explains why: on false,
// ParseDocument runs the slow path (checkShape, encoding/json, Validate), which finds the problem
// and words the error. decodeStrict therefore only has to be right when it says true, and then it
// must have decoded exactly what encoding/json decodes. TestFastPathMatchesSlowPath and
// FuzzParseDocument hold the two paths to each other (both ways: the fast path also takes every
// document the slow one decodes). It allocates only what the document holds.
func decodeStrict(data []byte, doc *ExecutionCellDocument) bool {
	d := decoder{data: data}
	switch d.next() {
	case '{':
		if !d.document(doc) {
			return false
		}
	case 'n': // null: the zero document, as encoding/json leaves it; Validate refuses it
		if !d.literal("null") {
			return false
		}
	default:
		return false
	}
	d.ws()
	return d.i == len(d.data) // trailing data
}

type decoder struct {
	data    []byte
	i       int    // the next byte to read
	scratch []byte // unescaped strings; allocated only when a string has escapes
}

// ws skips JSON whitespace.
func (d *decoder) ws() {
	for d.i < len(d.data) {
		switch d.data[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// next skips whitespace and returns the next byte without consuming it, 0 at the end.
func (d *decoder) next() byte {
	d.ws()
	if d.i < len(d.data) {
		return d.data[d.i]
	}
	return 0
}

// literal consumes lit if the input continues with it. What follows is checked by the caller
// (a ',', '}' or ']', or the end): "nullx" fails there.
func (d *decoder) literal(lit string) bool {
	if len(d.data)-d.i >= len(lit) && string(d.data[d.i:d.i+len(lit)]) == lit {
		d.i += len(lit)
		return true
	}
	return false
}

// nullOr looks at the next value: a null is consumed (isNull); want ('{' or '[') is left for the
// caller; anything else fails.
func (d *decoder) nullOr(want byte) (isNull, ok bool) {
	switch d.next() {
	case want:
		return false, true
	case 'n':
		return true, d.literal("null")
	}
	return false, false
}

// object reads an object whose '{' is next, calling member for each key with the input positioned
// at the key's value. The key may live in d.scratch: member must use it before decoding a string.
func (d *decoder) object(member func(key []byte) bool) bool {
	d.i++ // '{'
	if d.next() == '}' {
		d.i++
		return true
	}
	for {
		if d.next() != '"' {
			return false
		}
		key, ok := d.key()
		if !ok || d.next() != ':' {
			return false
		}
		d.i++
		if !member(key) {
			return false
		}
		switch d.next() {
		case ',':
			d.i++
		case '}':
			d.i++
			return true
		default:
			return false
		}
	}
}

// array reads an array whose '[' is next, calling elem for each element.
func (d *decoder) array(elem func() bool) bool {
	d.i++ // '['
	if d.next() == ']' {
		d.i++
		return true
	}
	for {
		if !elem() {
			return false
		}
		switch d.next() {
		case ',':
			d.i++
		case ']':
			d.i++
			return true
		default:
			return false
		}
	}
}

// once records field bit in seen and reports whether it was new: a second occurrence of a key is
// a duplicate, however it was escaped.
func once(seen *uint16, bit uint16) bool {
	if *seen&bit != 0 {
		return false
	}
	*seen |= bit
	return true
}

// scanString reads the string whose '"' is next and returns its raw contents (between the
// quotes) and whether they can be used as they are (no escapes, valid UTF-8).
func (d *decoder) scanString() (raw []byte, plain, ok bool) {
	start := d.i + 1
	plain = true
	ascii := true
	for i := start; i < len(d.data); {
		switch c := d.data[i]; {
		case c == '"':
			raw = d.data[start:i]
			d.i = i + 1
			if plain && !ascii && !utf8.Valid(raw) {
				plain = false // encoding/json replaces invalid bytes with U+FFFD
			}
			return raw, plain, true
		case c == '\\':
			plain = false
			if i+1 >= len(d.data) {
				return nil, false, false
			}
			switch d.data[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(d.data) || hex4(d.data[i+2:i+6]) < 0 {
					return nil, false, false
				}
				i += 6
			default:
				return nil, false, false
			}
		case c < ' ':
			return nil, false, false // control characters must be escaped
		default:
			if c >= utf8.RuneSelf {
				ascii = false
			}
			i++
		}
	}
	return nil, false, false // unterminated
}

// key reads a key: sliced from the input when plain, else unescaped into d.scratch.
func (d *decoder) key() ([]byte, bool) {
	raw, plain, ok := d.scanString()
	if !ok || plain {
		return raw, ok
	}
	d.scratch = unescape(d.scratch[:0], raw)
	return d.scratch, true
}

// str decodes a string (or null, which leaves dst as it is, as encoding/json does).
func (d *decoder) str(dst *string) bool {
	switch d.next() {
	case '"':
		raw, plain, ok := d.scanString()
		if !ok {
			return false
		}
		if !plain {
			d.scratch = unescape(d.scratch[:0], raw)
			raw = d.scratch
		}
		*dst = intern(raw)
		return true
	case 'n':
		return d.literal("null")
	}
	return false
}

// intern returns the words of the document vocabulary without a copy.
func intern(b []byte) string {
	switch string(b) {
	case APIVersion:
		return APIVersion
	case Kind:
		return Kind
	case MountBind:
		return MountBind
	case MountTmpfs:
		return MountTmpfs
	case "tcp":
		return "tcp"
	case "udp":
		return "udp"
	case "/":
		return "/"
	}
	return string(b)
}

// boolean decodes true, false or null (dst unchanged).
func (d *decoder) boolean(dst *bool) bool {
	switch d.next() {
	case 't':
		*dst = true
		return d.literal("true")
	case 'f':
		*dst = false
		return d.literal("false")
	case 'n':
		return d.literal("null")
	}
	return false
}

// integer reads an integer literal of at most 19 digits, which covers every int64 and uint32; a
// longer one fails (it overflows those types). Fractions and exponents are left unread, so the
// caller fails on them: encoding/json refuses them for integer fields.
func (d *decoder) integer() (mag uint64, neg, ok bool) {
	i := d.i
	if i < len(d.data) && d.data[i] == '-' {
		neg = true
		i++
	}
	start := i
	if i < len(d.data) && d.data[i] == '0' {
		i++
	} else {
		for i < len(d.data) && d.data[i] >= '0' && d.data[i] <= '9' {
			mag = mag*10 + uint64(d.data[i]-'0')
			i++
			if i-start > 19 {
				return 0, false, false
			}
		}
	}
	if i == start {
		return 0, false, false
	}
	d.i = i
	return mag, neg, true
}

// int64Value decodes an integer within int64, or null (dst unchanged).
func (d *decoder) int64Value(dst *int64) bool {
	switch c := d.next(); {
	case c == 'n':
		return d.literal("null")
	case c == '-' || (c >= '0' && c <= '9'):
		mag, neg, ok := d.integer()
		switch {
		case !ok:
			return false
		case neg && mag <= 1<<63:
			*dst = int64(-mag) // -(1<<63) wraps to itself: the minimum
		case !neg && mag < 1<<63:
			*dst = int64(mag)
		default:
			return false
		}
		return true
	}
	return false
}

// intValue decodes an integer within int, or null (dst unchanged).
func (d *decoder) intValue(dst *int) bool {
	n := int64(*dst)
	if !d.int64Value(&n) || int64(int(n)) != n {
		return false
	}
	*dst = int(n)
	return true
}

// uint32Value decodes an unsigned integer within uint32, or null (dst unchanged). A minus sign
// fails, even on "-0", which encoding/json refuses for unsigned fields.
func (d *decoder) uint32Value(dst *uint32) bool {
	switch c := d.next(); {
	case c == 'n':
		return d.literal("null")
	case c >= '0' && c <= '9':
		mag, _, ok := d.integer()
		if !ok || mag > 1<<32-1 {
			return false
		}
		*dst = uint32(mag)
		return true
	}
	return false
}

func (d *decoder) document(doc *ExecutionCellDocument) bool {
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "apiVersion":
			return once(&seen, 1<<0) && d.str(&doc.APIVersion)
		case "kind":
			return once(&seen, 1<<1) && d.str(&doc.Kind)
		case "spec":
			return once(&seen, 1<<2) && d.spec(&doc.Spec)
		}
		return false
	})
}

func (d *decoder) spec(s *CellSpec) bool {
	if isNull, ok := d.nullOr('{'); !ok || isNull {
		return ok
	}
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "id":
			return once(&seen, 1<<0) && d.str(&s.ID)
		case "run":
			return once(&seen, 1<<1) && d.run(&s.Run)
		case "rootfs":
			return once(&seen, 1<<2) && d.rootfs(&s.Rootfs)
		case "mounts":
			return once(&seen, 1<<3) && d.mounts(&s.Mounts)
		case "resources":
			return once(&seen, 1<<4) && d.resources(&s.Resources)
		case "network":
			return once(&seen, 1<<5) && d.network(&s.Network)
		case "lifetime":
			return once(&seen, 1<<6) && d.lifetime(&s.Lifetime)
		case "labels":
			return once(&seen, 1<<7) && d.stringMap(&s.Labels)
		}
		return false
	})
}

func (d *decoder) run(r *RunSpec) bool {
	if isNull, ok := d.nullOr('{'); !ok || isNull {
		return ok
	}
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "argv":
			return once(&seen, 1<<0) && d.stringList(&r.Argv)
		case "env":
			return once(&seen, 1<<1) && d.stringMap(&r.Env)
		case "workingDir":
			return once(&seen, 1<<2) && d.str(&r.WorkingDir)
		case "user":
			return once(&seen, 1<<3) && d.user(&r.User)
		}
		return false
	})
}

// user decodes run.user, which must give both ids, neither of them null: a user without "gid"
// would run in group 0.
func (d *decoder) user(dst **UserSpec) bool {
	isNull, ok := d.nullOr('{')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	u := new(UserSpec)
	var seen uint16
	ok = d.object(func(key []byte) bool {
		switch string(key) {
		case "uid":
			return once(&seen, 1<<0) && d.next() != 'n' && d.uint32Value(&u.UID)
		case "gid":
			return once(&seen, 1<<1) && d.next() != 'n' && d.uint32Value(&u.GID)
		}
		return false
	})
	*dst = u
	return ok && seen == 1<<0|1<<1
}

func (d *decoder) rootfs(dst **RootfsSpec) bool {
	isNull, ok := d.nullOr('{')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	r := new(RootfsSpec)
	*dst = r
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "path":
			return once(&seen, 1<<0) && d.str(&r.Path)
		case "writable":
			return once(&seen, 1<<1) && d.boolean(&r.Writable)
		}
		return false
	})
}

func (d *decoder) mounts(dst *[]MountSpec) bool {
	isNull, ok := d.nullOr('[')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	var buf [8]MountSpec
	ms := buf[:0]
	ok = d.array(func() bool {
		ms = append(ms, MountSpec{})
		return d.mount(&ms[len(ms)-1])
	})
	*dst = make([]MountSpec, len(ms))
	copy(*dst, ms)
	return ok
}

func (d *decoder) mount(m *MountSpec) bool {
	if isNull, ok := d.nullOr('{'); !ok || isNull {
		return ok
	}
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "type":
			return once(&seen, 1<<0) && d.str(&m.Type)
		case "source":
			return once(&seen, 1<<1) && d.str(&m.Source)
		case "destination":
			return once(&seen, 1<<2) && d.str(&m.Destination)
		case "readOnly":
			if !once(&seen, 1<<3) {
				return false
			}
			if d.next() == 'n' {
				m.ReadOnly = nil
				return d.literal("null")
			}
			b := new(bool)
			m.ReadOnly = b
			return d.boolean(b)
		case "sizeBytes":
			return once(&seen, 1<<4) && d.int64Value(&m.SizeBytes)
		}
		return false
	})
}

func (d *decoder) resources(dst **ResourceSpec) bool {
	isNull, ok := d.nullOr('{')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	r := new(ResourceSpec)
	*dst = r
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "memoryBytes":
			return once(&seen, 1<<0) && d.int64Value(&r.MemoryBytes)
		case "cpuMillis":
			return once(&seen, 1<<1) && d.int64Value(&r.CPUMillis)
		case "pids":
			return once(&seen, 1<<2) && d.int64Value(&r.Pids)
		}
		return false
	})
}

func (d *decoder) network(dst **NetworkSpec) bool {
	isNull, ok := d.nullOr('{')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	n := new(NetworkSpec)
	*dst = n
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "egress":
			return once(&seen, 1<<0) && d.egress(&n.Egress)
		}
		return false
	})
}

func (d *decoder) egress(dst *[]EgressRule) bool {
	isNull, ok := d.nullOr('[')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	var buf [8]EgressRule
	rules := buf[:0]
	ok = d.array(func() bool {
		rules = append(rules, EgressRule{})
		return d.rule(&rules[len(rules)-1])
	})
	*dst = make([]EgressRule, len(rules))
	copy(*dst, rules)
	return ok
}

func (d *decoder) rule(r *EgressRule) bool {
	if isNull, ok := d.nullOr('{'); !ok || isNull {
		return ok
	}
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "cidr":
			return once(&seen, 1<<0) && d.str(&r.CIDR)
		case "port":
			return once(&seen, 1<<1) && d.intValue(&r.Port)
		case "protocol":
			return once(&seen, 1<<2) && d.str(&r.Protocol)
		}
		return false
	})
}

func (d *decoder) lifetime(dst **LifetimeSpec) bool {
	isNull, ok := d.nullOr('{')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	l := new(LifetimeSpec)
	*dst = l
	var seen uint16
	return d.object(func(key []byte) bool {
		switch string(key) {
		case "ttlSeconds":
			return once(&seen, 1<<0) && d.int64Value(&l.TTLSeconds)
		}
		return false
	})
}

// stringList decodes a list of strings; a null element is "", as encoding/json makes it.
func (d *decoder) stringList(dst *[]string) bool {
	isNull, ok := d.nullOr('[')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	var buf [16]string
	l := buf[:0]
	ok = d.array(func() bool {
		l = append(l, "")
		return d.str(&l[len(l)-1])
	})
	*dst = make([]string, len(l))
	copy(*dst, l)
	return ok
}

// stringMap decodes an object of strings; a null value is "", as encoding/json makes it.
func (d *decoder) stringMap(dst *map[string]string) bool {
	isNull, ok := d.nullOr('{')
	if !ok || isNull {
		*dst = nil
		return ok
	}
	m := make(map[string]string)
	*dst = m
	return d.object(func(key []byte) bool {
		if _, dup := m[string(key)]; dup {
			return false
		}
		k := string(key) // before d.str reuses d.scratch
		var v string
		if !d.str(&v) {
			return false
		}
		m[k] = v
		return true
	})
}

// hex4 is the value of four hex digits, or -1.
func hex4(b []byte) rune {
	var r rune
	for _, c := range b[:4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return -1
		}
		r = r<<4 | rune(c)
	}
	return r
}

// unescape appends the string raw (the contents of a literal that scanString accepted) to dst as
// encoding/json decodes it: escapes resolved, a surrogate pair joined, a lone surrogate and
// each byte of invalid UTF-8 replaced by U+FFFD.
func unescape(dst, raw []byte) []byte {
	for r := 0; r < len(raw); {
		switch c := raw[r]; {
		case c == '\\':
			switch e := raw[r+1]; e {
			case 'b':
				dst = append(dst, '\b')
			case 'f':
				dst = append(dst, '\f')
			case 'n':
				dst = append(dst, '\n')
			case 'r':
				dst = append(dst, '\r')
			case 't':
				dst = append(dst, '\t')
			case 'u':
				rr := hex4(raw[r+2:])
				r += 6
				if utf16.IsSurrogate(rr) {
					rr1 := rune(-1)
					if r+6 <= len(raw) && raw[r] == '\\' && raw[r+1] == 'u' {
						rr1 = hex4(raw[r+2:])
					}
					if dec := utf16.DecodeRune(rr, rr1); dec != unicode.ReplacementChar {
						r += 6
						dst = utf8.AppendRune(dst, dec)
						continue
					}
					rr = unicode.ReplacementChar
				}
				dst = utf8.AppendRune(dst, rr)
				continue
			default: // '"', '\\', '/'
				dst = append(dst, e)
			}
			r += 2
		case c < utf8.RuneSelf:
			dst = append(dst, c)
			r++
		default:
			rr, size := utf8.DecodeRune(raw[r:])
			dst = utf8.AppendRune(dst, rr)
			r += size
		}
	}
	return dst
}
