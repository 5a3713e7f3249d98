// Reads one record per line on stdin ("request<TAB>json" or
// "response<TAB>json"), parses it into records with the AgentEnsemble wire
// shape (component names, order and annotations as the Java project declares
// them) with a plain Jackson ObjectMapper, writes it again and prints it:
// what a Java process reads from and writes for the same record.
//
// A java.time.Duration is written by Jackson's Java time module as seconds
// with nine decimals; Debian ships no jsr310 module, so the durations are
// BigDecimal components here, which Jackson writes the same way (the scale
// the text had).
import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonInclude;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;

public class JacksonRoundTrip {
    enum Priority { CRITICAL, HIGH, NORMAL, LOW }

    enum DeliveryMethod { WEBSOCKET, QUEUE, TOPIC, WEBHOOK, STORE, BROADCAST_CLAIM, NONE }

    enum CachePolicy { USE_CACHED, FORCE_FRESH }

    @JsonIgnoreProperties(ignoreUnknown = true)
    @JsonInclude(JsonInclude.Include.NON_NULL)
    record DeliverySpec(DeliveryMethod method, String address) {}

    @JsonIgnoreProperties(ignoreUnknown = true)
    @JsonInclude(JsonInclude.Include.NON_NULL)
    record TraceContext(String traceparent, String tracestate) {}

    @JsonIgnoreProperties(ignoreUnknown = true)
    @JsonInclude(JsonInclude.Include.NON_NULL)
    record WorkRequest(
            String requestId,
            String from,
            String task,
            String context,
            Priority priority,
            BigDecimal deadline,
            DeliverySpec delivery,
            TraceContext traceContext,
            CachePolicy cachePolicy,
            String cacheKey,
            BigDecimal maxAge) {
        WorkRequest {
            if (priority == null) {
                priority = Priority.NORMAL;
            }
            if (delivery == null) {
                delivery = new DeliverySpec(DeliveryMethod.WEBSOCKET, null);
            }
        }
    }

    @JsonIgnoreProperties(ignoreUnknown = true)
    @JsonInclude(JsonInclude.Include.NON_NULL)
    record WorkResponse(String requestId, String status, String result, String error, Long durationMs) {}

    public static void main(String[] args) throws Exception {
        ObjectMapper mapper = new ObjectMapper();
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            int tab = line.indexOf('\t');
            String kind = line.substring(0, tab);
            String json = line.substring(tab + 1);
            Class<?> type = kind.equals("request") ? WorkRequest.class : WorkResponse.class;
            out.println(mapper.writeValueAsString(mapper.readValue(json, type)));
        }
    }
}
